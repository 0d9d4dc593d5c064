//! TLS: HTTP/1.1 and HTTP/2 over the configured certificate, reloaded when its files change.

use crate::common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http1_and_http2_over_tls_with_the_configured_certificate() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let h2 = corral
        .client()
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        h2.version(),
        reqwest::Version::HTTP_2,
        "ALPN should pick h2"
    );
    assert_eq!(h2.status(), 200);
    let h1 = corral
        .client_builder()
        .http1_only()
        .build()
        .unwrap()
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    assert_eq!(h1.status(), 200);
    // A client that does not trust the CA is refused by its own TLS check.
    let untrusting = reqwest::Client::builder()
        .resolve("localhost", loopback(corral.port))
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .is_err());
}

async fn served_certificate(corral: &Corral) -> Vec<u8> {
    let client = corral
        .client_builder()
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let resp = client
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .unwrap();
    let info = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    info.peer_certificate().expect("a certificate").to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let first = std::fs::read_to_string(&corral.certs.cert).unwrap();
    assert_eq!(served_certificate(&corral).await, der_of(&first));

    // An open stream must survive the swap.
    double.set_token_delay(Duration::from_millis(200));
    let client = corral.client();
    let mut stream = client
        .post(format!("{}/api/generate", corral.base()))
        .json(&serde_json::json!({"model": "llama3.2", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    next_chunk(&mut stream).await.unwrap();

    // Renewal as cert-manager or certbot does it: new files written in place.
    let (cert, key) = corral
        .certs
        .ca
        .issue("second", &["localhost", "127.0.0.1"])
        .unwrap();
    std::fs::write(&corral.certs.key, &key).unwrap();
    std::fs::write(&corral.certs.cert, &cert).unwrap();
    let want = der_of(&cert);
    wait_for_async(
        Duration::from_secs(20),
        "the new certificate to be served",
        || async { (served_certificate(&corral).await == want).then_some(()) },
    )
    .await;

    let (rest, complete) = rest_text(&mut stream).await;
    assert!(
        complete && rest.contains("\"done\":true"),
        "stream cut by the reload: {rest}"
    );
    assert!(corral.stderr_text().contains("TLS certificate reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_renewal_keeps_the_old_certificate() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let first = der_of(&std::fs::read_to_string(&corral.certs.cert).unwrap());
    std::fs::write(&corral.certs.cert, "not a certificate").unwrap();
    wait_for(
        Duration::from_secs(20),
        "the reload error in the log",
        || {
            corral
                .stderr_text()
                .contains("TLS certificate not reloaded")
                .then_some(())
        },
    );
    assert_eq!(served_certificate(&corral).await, first);
}

/// A refusal sent before the request body was read reaches HTTP/2 clients that are strict about
/// stream resets (curl, Node), not only hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_the_body_reach_strict_http2_clients() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let ca = corral.dir.path().join("curl-ca.pem");
    std::fs::write(&ca, &corral.certs.ca_pem).unwrap();
    let body = corral.dir.path().join("body.json");
    std::fs::write(&body, format!("{{\"prompt\":\"{}\"}}", "a".repeat(100_000))).unwrap();
    for (path, status) in [("/api/generate", "401"), ("/api/nope", "404")] {
        let mut curl = std::process::Command::new("curl");
        curl.args([
            "-s",
            "--http2",
            "-w",
            "\n%{http_code} %{http_version}",
            "--cacert",
        ])
        .arg(&ca)
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("{}{path}", corral.base()));
        let out = tokio::task::spawn_blocking(move || curl.output().expect("curl is installed"))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{path}: curl failed: {out:?}");
        assert!(text.ends_with(&format!("{status} 2")), "{path}: {text}");
        assert!(text.starts_with("{\"error\":"), "{path}: {text}");
    }
}
