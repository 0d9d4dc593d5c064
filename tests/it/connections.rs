//! Connections and what they hold are bounded (issue 12, F3): a server-wide cap and a per-address
//! cap refuse new connections at once and count them, and a connection that never completes its
//! TLS handshake, or never sends a request after it, is closed after `server.header_timeout`
//! (pingora's own handshake deadline is 60 s). Requests in flight (HTTP/2 streams included) and
//! the request bodies held in memory have caps of their own. What an idle connection costs in
//! memory is measured by `cargo bench --bench connections`, not here.

use crate::common::raw::{h2_connect, h2_open, h2_response, tls_connect};
use crate::common::*;
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// `n` TCP connections to `port` from the loopback address `from`, sending nothing.
async fn open_from(port: u16, from: Ipv4Addr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind((from, 0).into()).unwrap();
        out.push(socket.connect(loopback(port)).await.unwrap());
    }
    out
}

/// Whether the server closed the connection (EOF or reset) within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Waits `wait` on all of `streams` at once; how many the server closed meanwhile.
async fn count_closed(streams: Vec<TcpStream>, wait: Duration) -> (Vec<TcpStream>, usize) {
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| tokio::spawn(async move { (closed_within(&mut s, wait).await, s) }))
        .collect();
    let mut out = Vec::new();
    let mut closed = 0;
    for t in tasks {
        let (c, s) = t.await.unwrap();
        closed += c as usize;
        out.push(s);
    }
    (out, closed)
}

async fn metric(corral: &Corral, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&corral.metrics().await, name, labels)
}

async fn wait_metric(corral: &Corral, name: &str, labels: &[(&str, &str)], want: f64) {
    wait_for_async(Duration::from_secs(40), name, || async {
        (metric(corral, name, labels).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_and_per_address_caps_refuse_new_connections_at_once() {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    cfg.server.max_connections = 1500;
    cfg.server.max_connections_per_ip = 1000;
    // Long enough that no admitted connection is closed by its deadline during the test.
    cfg.server.header_timeout = corral::config::HumanDuration::secs(600);
    let corral = Corral::start(cfg);

    let first = Ipv4Addr::new(127, 0, 0, 1);
    let second = Ipv4Addr::new(127, 0, 0, 2);
    let one = open_from(corral.port, first, 1100).await;
    wait_metric(
        &corral,
        "corral_connections_refused_total",
        &[("reason", "max_connections_per_ip")],
        100.0,
    )
    .await;
    let two = open_from(corral.port, second, 600).await;
    wait_metric(
        &corral,
        "corral_connections_refused_total",
        &[("reason", "max_connections")],
        100.0,
    )
    .await;
    assert_eq!(
        metric(&corral, "corral_connections_open", &[]).await,
        1500.0
    );

    // The refused ones are closed at once; the admitted ones stay open.
    let (one, closed_one) = count_closed(one, Duration::from_secs(2)).await;
    let (two, closed_two) = count_closed(two, Duration::from_secs(2)).await;
    assert_eq!(closed_one + closed_two, 200);

    // Places come back when connections close, and a client under its cap still gets in.
    drop(one);
    wait_metric(&corral, "corral_connections_open", &[], 500.0).await;
    let resp = corral
        .client()
        .get(format!("{}/api/tags", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(two);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_stall_before_or_after_the_handshake_are_closed_at_the_deadline() {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    cfg.server.header_timeout = corral::config::HumanDuration::secs(2);
    cfg.server.max_connections_per_ip = 0;
    let corral = Corral::start(cfg);

    // Silent TCP connections, and some that send half a ClientHello.
    let mut silent = open_from(corral.port, Ipv4Addr::LOCALHOST, 1000).await;
    let mut partial = open_from(corral.port, Ipv4Addr::LOCALHOST, 20).await;
    for s in &mut partial {
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
    }
    // Finished handshakes that never send a request.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tls_connect(corral.port, &corral.certs.ca_pem, b"http/1.1").await);
    }

    // pingora alone would hold the unfinished handshakes for 60 s.
    wait_metric(
        &corral,
        "corral_tls_handshake_failures_total",
        &[("reason", "timeout")],
        1020.0,
    )
    .await;
    wait_metric(&corral, "corral_connections_open", &[], 0.0).await;
    silent.append(&mut partial);
    let (_, closed) = count_closed(silent, Duration::from_secs(5)).await;
    assert_eq!(closed, 1020);
    for t in &mut idle {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "an idle TLS connection is still open");
    }
    // And corral still serves.
    let resp = corral
        .client()
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

type Answer = (usize, (u16, http::HeaderMap, bytes::Bytes));

async fn next_answer(answered: &mut tokio::sync::mpsc::UnboundedReceiver<Answer>) -> Answer {
    tokio::time::timeout(Duration::from_secs(30), answered.recv())
        .await
        .expect("an answer")
        .unwrap()
}

/// Opens twelve streams on one HTTP/2 connection, on a public route that takes no body, and
/// ends none of them: a request cap of eight holds eight waiting and answers the other four 503
/// at once. Then ends the held ones, which are answered normally.
async fn streams_past_a_request_cap(edit: impl FnOnce(&mut corral::config::Config), reason: &str) {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    edit(&mut cfg);
    let corral = Corral::start(cfg);
    let mut h2 = h2_connect(corral.port, &corral.certs.ca_pem).await;
    let uri = format!("https://localhost:{}/api/version", corral.port);
    let (answered_tx, mut answered) = tokio::sync::mpsc::unbounded_channel();
    let mut streams = Vec::new();
    for i in 0..12 {
        let (response, stream) = h2_open(&mut h2, "GET", &uri, &[]).await;
        let answered_tx = answered_tx.clone();
        tokio::spawn(async move {
            let _ = answered_tx.send((i, h2_response(response).await));
        });
        streams.push(stream);
    }
    let mut refused = Vec::new();
    for _ in 0..4 {
        let (i, (status, headers, body)) = next_answer(&mut answered).await;
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["retry-after"], "1");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("try again"),
            "{body}"
        );
        refused.push(i);
    }
    assert_eq!(
        metric(
            &corral,
            "corral_requests_refused_total",
            &[("reason", reason)]
        )
        .await,
        4.0
    );
    for (i, stream) in streams.iter_mut().enumerate() {
        if !refused.contains(&i) {
            stream.send_data(bytes::Bytes::new(), true).unwrap();
        }
    }
    for _ in 0..8 {
        let (i, (status, _, _)) = next_answer(&mut answered).await;
        assert_eq!(
            status, 200,
            "stream {i}, held under the cap, is served once it ends"
        );
    }
    // The places came back with the answers.
    let resp = corral
        .anonymous_client()
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_past_the_per_address_cap_are_refused_at_once() {
    streams_past_a_request_cap(
        |cfg| cfg.server.max_requests_per_ip = Some(8),
        "max_requests_per_ip",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_past_the_total_cap_are_refused_at_once() {
    streams_past_a_request_cap(
        |cfg| {
            cfg.server.max_requests = 8;
            cfg.server.max_requests_per_ip = Some(0);
        },
        "max_requests",
    )
    .await;
}

/// Request bodies held in memory share `server.max_body_memory`, and one team may hold half of
/// it. Memory is taken as bytes arrive, never for a length only declared. A body that does not fit
/// is refused at once, and the memory comes back when its holder goes away or is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_memory_budget_are_503_until_the_memory_comes_back() {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    cfg.server.max_body = corral::config::ByteSize::mib(1);
    cfg.server.max_body_memory = corral::config::ByteSize::mib(2);
    for team in ["test", "other"] {
        let all = corral::config::TeamConfig {
            models: vec!["*".into()],
            ..Default::default()
        };
        cfg.teams.insert(team.into(), all);
    }
    let corral = Corral::start(cfg);
    let other = corral.issue("other", None, None);
    let held_gauge = "corral_request_body_memory_bytes";
    let held = || async { metric(&corral, held_gauge, &[]).await };
    let chat =
        serde_json::json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]});
    let send = |key: String| {
        let (client, base, chat) = (corral.anonymous_client(), corral.base(), chat.clone());
        async move {
            client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&chat)
                .send()
                .await
                .unwrap()
        }
    };

    // A client of the team `test` declares a body of the largest size and sends its start only:
    // it holds what it sent, not what it declared.
    let mut h2 = h2_connect(corral.port, &corral.certs.ca_pem).await;
    let auth = format!("Bearer {}", corral.key);
    let uri = format!("https://localhost:{}/api/chat", corral.port);
    let (response, mut stream) = h2_open(
        &mut h2,
        "POST",
        &uri,
        &[("authorization", &auth), ("content-length", "1048576")],
    )
    .await;
    stream
        .send_data(
            bytes::Bytes::from_static(b"{\"model\":\"x\",\"p\":\""),
            false,
        )
        .unwrap();
    wait_for_async(Duration::from_secs(30), "the first bytes held", || async {
        (held().await > 0.0).then_some(())
    })
    .await;
    assert!(held().await < 65536.0, "{}", held().await);
    assert_eq!(send(corral.key.clone()).await.status(), 200);

    // It sends all but the last bytes: the team's half of the budget is taken.
    stream
        .send_data(bytes::Bytes::from(vec![b'a'; 1048576 - 64]), false)
        .unwrap();
    wait_for_async(Duration::from_secs(30), "the team's half held", || async {
        (held().await >= 1048576.0 - 64.0).then_some(())
    })
    .await;

    // The same team's next body is refused in its own dialect, and Ollama sees nothing of it.
    let before = forwarded(&double).len();
    let resp = send(corral.key.clone()).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert_eq!(forwarded(&double).len(), before);
    assert_eq!(
        metric(
            &corral,
            "corral_requests_refused_total",
            &[("reason", "body_memory")]
        )
        .await,
        1.0
    );
    // Another team still has its own half.
    assert_eq!(send(other.clone()).await.status(), 200);

    // The holder gives up: its memory comes back, and the next body is read.
    drop((response, stream));
    wait_metric(&corral, held_gauge, &[], 0.0).await;
    assert_eq!(send(corral.key.clone()).await.status(), 200);
    // A body is let go once Ollama answers, not kept for the rest of the exchange.
    assert_eq!(held().await, 0.0);
    drop(h2);
}
