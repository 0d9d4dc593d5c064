//! `corral demo` works as a newcomer would use it: its printed commands run as printed.

use crate::common::*;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A demo process, killed when its test ends however it ends (a failed test must not leave a
/// gateway running: one left spinning slowed every later run on the machine).
struct Demo(std::process::Child);

impl Demo {
    /// `corral demo` on these ports; the caller adds what it needs, then [`Demo::spawn`].
    fn command(port: u16, metrics: u16) -> Command {
        let mut cmd = Command::new(corral_bin());
        cmd.args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ]);
        cmd
    }

    fn spawn(cmd: &mut Command) -> Demo {
        Demo(cmd.spawn().unwrap())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_demo_serves_and_its_curl_examples_work_as_printed() {
    let (port, metrics) = (reserve_port(), reserve_port());
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Demo::spawn(
        Demo::command(port, metrics)
            .arg("--dir")
            .arg(dir.path())
            .args(["--token-delay", "5ms"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let child = &mut demo.0;
    let mut banner = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let end = line.starts_with("Requests are logged below");
        banner.push(line);
        if end {
            break;
        }
    }
    wait_for(Duration::from_secs(30), "the demo to listen", || {
        TcpStream::connect(loopback(port)).is_ok().then_some(())
    });
    let text = banner.join("\n");
    assert!(
        dir.path().join("corral.toml").exists() && dir.path().join("ca.pem").exists(),
        "{text}"
    );

    // Join continuation lines, then run the export and every curl command exactly as printed,
    // in one shell: the key goes through $CORRAL_KEY as the banner says.
    let joined = text.replace("\\\n", " ");
    let export = joined
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("export CORRAL_KEY="))
        .expect("the key");
    let curls: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert!(curls.len() >= 4, "{text}");
    for curl in curls {
        let expect = if curl.contains("# no key: 401") {
            "401"
        } else {
            "200"
        };
        let script = format!(
            "{export}\n{}",
            curl.replacen("curl ", "curl -sS -o /dev/null -w '%{http_code}' ", 1)
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let code = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            code,
            expect,
            "{curl}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The config the demo wrote is one `corral check` accepts.
    let check = Command::new(corral_bin())
        .args(["check", "--config"])
        .arg(dir.path().join("corral.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Requests show up in the log below the banner.
    let logged = lines
        .map(Result::unwrap)
        .find(|l| !l.trim().is_empty())
        .unwrap();
    assert!(logged.contains(" 200 GET /api/version"), "{logged}");
    drop(demo);
}

/// Without --dir the demo writes into a temporary folder of its own (its signing key among the
/// files) and deletes it when it stops, on SIGTERM and on Ctrl-C alike.
#[test]
fn the_demo_removes_its_own_files_when_it_stops() {
    for signal in ["TERM", "INT"] {
        let tmp = tempfile::tempdir().unwrap();
        let (port, metrics) = (reserve_port(), reserve_port());
        let mut demo = Demo::spawn(
            Demo::command(port, metrics)
                .env("TMPDIR", tmp.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let child = &mut demo.0;
        let own = tmp.path().join(format!("corral-demo-{}", child.id()));
        wait_for(Duration::from_secs(30), "the demo to listen", || {
            TcpStream::connect(loopback(port)).is_ok().then_some(())
        });
        assert!(own.join("keys/demo.key.pem").exists(), "{signal}");
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        wait_for(Duration::from_secs(30), "the demo to stop", || {
            child.try_wait().unwrap()
        });
        assert!(!own.exists(), "{signal}: {} is left behind", own.display());
    }
}
