//! Raw protocol peers for framing tests: an HTTP/1.1 upstream that records the exact bytes it
//! receives, and an HTTP/2 client that sends exactly the frames a test asks for.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as it arrived on the wire.
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// The request line and headers, as sent (without the blank line).
    pub head: String,
    /// The body bytes as framed on the wire (chunk sizes and terminators included).
    pub wire_body: Vec<u8>,
    /// Which connection (0, 1, ...) it came on.
    pub connection: usize,
}

impl RawRequest {
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

#[derive(Default)]
struct Log {
    requests: Vec<RawRequest>,
    /// Bytes that arrived where a request should start but do not start one (a desynchronised
    /// connection): what a stray chunk terminator looks like to the server.
    stray: Vec<Vec<u8>>,
    connections: usize,
}

/// An HTTP/1.1 server that answers like a minimal Ollama and records every byte. It parses
/// framing strictly (as Go's net/http does): anything that is not a request line where one
/// should be gets `400 Bad Request` and the connection is closed.
pub struct RawUpstream {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    pub async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let state = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let id = {
                    let mut l = state.lock().unwrap();
                    l.connections += 1;
                    l.connections - 1
                };
                tokio::spawn(serve(sock, id, state.clone()));
            }
        });
        RawUpstream { addr, log, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.log.lock().unwrap().requests.clone()
    }

    /// Requests on `path` (corral's own probes and preloads carry `User-Agent: corral/`).
    pub fn forwarded(&self) -> Vec<RawRequest> {
        self.requests()
            .into_iter()
            .filter(|r| {
                !r.header("user-agent")
                    .is_some_and(|ua| ua.starts_with("corral/"))
            })
            .collect()
    }

    pub fn stray(&self) -> Vec<Vec<u8>> {
        self.log.lock().unwrap().stray.clone()
    }
}

fn find(buf: &[u8], pat: &[u8]) -> Option<usize> {
    buf.windows(pat.len()).position(|w| w == pat)
}

/// Reads until `buf` holds at least `n` bytes; `false` on end of stream.
async fn fill(sock: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    while buf.len() < n {
        let mut chunk = [0u8; 8192];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    true
}

/// Reads until `pat` is in `buf` (from `from` on); its index, or `None` on end of stream.
async fn fill_until(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    from: usize,
    pat: &[u8],
) -> Option<usize> {
    loop {
        if let Some(i) = find(&buf[from.min(buf.len())..], pat) {
            return Some(from + i);
        }
        let want = buf.len() + 1;
        if !fill(sock, buf, want).await {
            return None;
        }
    }
}

fn looks_like_request_line(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && target.starts_with('/')
        && version.starts_with("HTTP/1.")
}

async fn serve(mut sock: TcpStream, connection: usize, log: Arc<Mutex<Log>>) {
    let mut buf = Vec::new();
    loop {
        // A request starts here, or the connection is done.
        if buf.is_empty() && !fill(&mut sock, &mut buf, 1).await {
            return;
        }
        let line_end = match fill_until(&mut sock, &mut buf, 0, b"\r\n").await {
            Some(i) => i,
            None => {
                log.lock().unwrap().stray.push(std::mem::take(&mut buf));
                return;
            }
        };
        if !looks_like_request_line(&buf[..line_end]) {
            log.lock().unwrap().stray.push(std::mem::take(&mut buf));
            let _ = sock
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: 26\r\n\r\n400 Bad Request: bad line")
                .await;
            return;
        }
        let Some(head_end) = fill_until(&mut sock, &mut buf, 0, b"\r\n\r\n").await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut rest = buf.split_off(head_end + 4);
        let req = RawRequest {
            head,
            wire_body: Vec::new(),
            connection,
        };
        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        let length: usize = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body_end = if chunked {
            // size line, data, CRLF ... up to the last chunk and the blank line after it.
            let mut at = 0;
            loop {
                let Some(size_end) = fill_until(&mut sock, &mut rest, at, b"\r\n").await else {
                    return;
                };
                let size_text = String::from_utf8_lossy(&rest[at..size_end]).into_owned();
                let Ok(size) = usize::from_str_radix(size_text.trim(), 16) else {
                    log.lock().unwrap().stray.push(rest.clone());
                    return;
                };
                at = size_end + 2;
                if size == 0 {
                    if !fill(&mut sock, &mut rest, at + 2).await {
                        return;
                    }
                    break at + 2;
                }
                if !fill(&mut sock, &mut rest, at + size + 2).await {
                    return;
                }
                at += size + 2;
            }
        } else {
            if !fill(&mut sock, &mut rest, length).await {
                return;
            }
            length
        };
        buf = rest.split_off(body_end);
        let req = RawRequest {
            wire_body: rest,
            ..req
        };
        let response = answer(&req);
        log.lock().unwrap().requests.push(req);
        if sock.write_all(&response).await.is_err() {
            return;
        }
    }
}

fn answer(req: &RawRequest) -> Vec<u8> {
    let mut parts = req.request_line().split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body): (&str, &str) = match (method, path) {
        (_, "/") => ("200 OK", "Ollama is running"),
        (_, "/api/version") => ("200 OK", r#"{"version":"0.33.0"}"#),
        (_, "/api/tags") => ("200 OK", r#"{"models":[]}"#),
        ("POST", p) if p.starts_with("/api/blobs/") => ("201 Created", ""),
        _ => ("404 Not Found", "404 page not found"),
    };
    let body_out = if method == "HEAD" { "" } else { body };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body_out}",
        body.len()
    )
    .into_bytes()
}

/// A TLS connection to `port` (trusting `ca_pem`, SNI `localhost`) offering one ALPN protocol.
pub async fn tls_connect(
    port: u16,
    ca_pem: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    tls
}

/// Sends raw bytes over HTTP/1.1 and TLS, and reads the answer until the server closes.
pub async fn h1_raw(port: u16, ca_pem: &str, request: &[u8]) -> String {
    let mut tls = tls_connect(port, ca_pem, b"http/1.1").await;
    tls.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tls.read_to_end(&mut out),
    )
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/2 connection over TLS to `port` (trusting `ca_pem`, SNI `localhost`).
pub async fn h2_connect(port: u16, ca_pem: &str) -> h2::client::SendRequest<Bytes> {
    let tls = tls_connect(port, ca_pem, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends a request whose body is `data` (any number of DATA frames, maybe none) followed by an
/// empty DATA frame carrying END_STREAM, as `curl -T -` does; returns status and body.
pub async fn h2_request(
    send: &mut h2::client::SendRequest<Bytes>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    data: &[&[u8]],
) -> (u16, Bytes) {
    let (response, mut stream) = h2_open(send, method, uri, headers).await;
    for d in data {
        stream.send_data(Bytes::copy_from_slice(d), false).unwrap();
    }
    stream.send_data(Bytes::new(), true).unwrap();
    let (status, _, body) = h2_response(response).await;
    (status, body)
}

/// Opens a request stream and leaves it open: the server has the header and waits for the rest.
pub async fn h2_open(
    send: &mut h2::client::SendRequest<Bytes>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut req = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut ready = send.clone().ready().await.unwrap();
    ready.send_request(req.body(()).unwrap(), false).unwrap()
}

/// Status, headers and whole body of an HTTP/2 response.
pub async fn h2_response(response: h2::client::ResponseFuture) -> (u16, http::HeaderMap, Bytes) {
    let response = response.await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (status, headers, Bytes::from(out))
}

/// One step of a scripted upstream's answer.
#[derive(Clone, Debug)]
pub enum Step {
    /// Write these bytes.
    Write(Vec<u8>),
    /// Wait.
    Pause(std::time::Duration),
    /// Close the connection (whatever framing was promised).
    Close,
}

/// An upstream that answers every request (after reading its header and `Content-Length`
/// body) with the same scripted bytes, pauses and closes: for edges no real server produces on
/// purpose, such as a stream whose connection drops right after its last event.
pub async fn scripted_upstream(steps: Vec<Step>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let steps = steps.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(head_end) = fill_until(&mut sock, &mut buf, 0, b"\r\n\r\n").await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if !fill(&mut sock, &mut buf, head_end + 4 + length).await {
                    return;
                }
                for step in steps {
                    match step {
                        Step::Write(bytes) => {
                            if sock.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Step::Pause(d) => tokio::time::sleep(d).await,
                        Step::Close => return,
                    }
                }
                // Script done without a Close: keep the connection until the peer leaves.
                let mut rest = [0u8; 64];
                while matches!(sock.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, task)
}

/// A chunk of a chunked body.
pub fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}
