//! Records the git commit for `corral --version` (CORRAL_COMMIT overrides it, e.g. in container
//! builds without a .git directory).

fn main() {
    println!("cargo:rerun-if-env-changed=CORRAL_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("CORRAL_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
    println!(
        "cargo:rustc-env=CORRAL_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
