"""Runs JavaScript in a real headless Chromium page served from a loopback origin of our choosing.

    from browser import run_page
    r = run_page('''
        const res = await fetch(GATEWAY + "/v1/models", {headers: {authorization: "Bearer " + KEY}});
        return {status: res.status, retry: res.headers.get("retry-after")};
    ''', origin_port=free_port(), ca_pem=gateway.ca)
    assert r["ok"], r            # the repr shows the browser console, e.g. "blocked by CORS policy"
    assert r["value"]["status"] == 200

The page at http://{host}:{origin_port}/ runs `script_js` as the body of an async function. When it
returns (any JSON-able value) or throws, the page POSTs
    {"ok": true, "value": ...}   or   {"ok": false, "error": String(e), "name": e.name}
to /result on its own origin; run_page returns that dict (a PageResult, whose `.console` lists the
browser console and `.log` holds Chromium's whole stderr) and then stops Chromium and the server.
Interpolate Python values into the script with json.dumps(), not by hand.

Needs Debian's chromium package (/usr/bin/chromium; the CHROMIUM environment variable overrides
it) and `cryptography` (a dependency of trustme) for ca_pem.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:  # the suite's port allocator, so pages and gateways never pick the same port
    from conftest import free_port as _free_port
except ImportError:  # used outside tests/e2e
    _free_port = None

# Flags, all needed here (root, no network, no display, no D-Bus, a small /dev/shm):
#   --headless=new              the real browser (same network stack, CORS and Private Network
#                               Access code as a desktop Chromium), without a window
#   --no-sandbox                Chromium refuses to start as root with its sandbox on
#   --disable-gpu               no GPU; avoids GPU-process start-up failures and retries
#   --disable-dev-shm-usage     shared memory in /tmp: /dev/shm is small in containers
#   --disable-quic              no HTTP/3 attempts (corral speaks TCP TLS only)
#   --no-first-run, --disable-background-networking, --disable-component-update, --disable-sync
#                               no first-run UI, update checks, or calls to Google's services,
#                               which would only time out without a network and add noise
#   --no-proxy-server           ignore any http_proxy in the environment: loopback only
#   (none for Private Network Access: the page's origin and corral are both loopback, 127.0.0.1
#   and localhost, so Chromium 156 neither sends Access-Control-Request-Private-Network in the
#   preflight nor asks a local-network permission; checked. A page on a non-loopback address
#   would be a different story, and there is none in these tests.)
#   --user-data-dir=<fresh tmp> a clean profile per run (no cache, no HSTS state, no cookies);
#                               also required for --ignore-certificate-errors-spki-list to apply
#   --enable-logging=stderr --v=0
#                               console messages (console.log, and the browser's own "Access to
#                               fetch ... has been blocked by CORS policy") go to stderr, where
#                               run_page collects them into PageResult.console and its errors
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--enable-logging=stderr",
    "--v=0",
]

# Trusting the test CA. Chromium on Linux ignores SSL_CERT_FILE and has no flag that adds a root;
# the choices are an NSS database under $HOME (needs certutil, from libnss3-tools),
# --ignore-certificate-errors (accepts any certificate for any host: a test could then pass
# against the wrong server or a broken chain), or
# --ignore-certificate-errors-spki-list=<base64 sha256 of a SubjectPublicKeyInfo>,... (honoured
# only with --user-data-dir), which accepts a chain only if one of the listed keys is in it. We use
# the last: only the test's own certificates are accepted. Chromium matches the list against the
# certificates the server *sends* (the leaf and any intermediates), never against a root the chain
# ends at, and a server does not send its root. Checked with Debian's Chromium 156: pinning the
# trustme CA alone fails (ERR_CERT_AUTHORITY_INVALID, fetch() throws "Failed to fetch"); pinning
# the leaf works; pinning an intermediate the server sends works; pinning another key fails. So
# _pins() turns ca_pem into the key of the served leaf: given the CA's *path* (the gateway
# fixture's `gateway.ca`), it pins every certificate that CA issued found beside it (tls.crt);
# given PEM text, it pins every certificate in it, and refuses text holding only a root.


def spki_sha256(pem: str | bytes) -> list[str]:
    """base64(sha256(SubjectPublicKeyInfo DER)) of each certificate in a PEM bundle."""
    from cryptography import x509

    if isinstance(pem, str):
        pem = pem.encode()
    return [_spki(c) for c in x509.load_pem_x509_certificates(pem)]


def _spki(cert) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _pins(ca_pem: str) -> list[str]:
    """SPKI pins for ca_pem (see above): PEM text (leaf, chain, or intermediates), or the path of
    a CA's PEM file with the certificates it issued beside it as *.crt / *.pem."""
    from cryptography import x509

    def root(c):
        return c.subject == c.issuer

    def issued_by(c, ca):
        try:
            c.verify_directly_issued_by(ca)
            return True
        except Exception:
            return False

    if "-----BEGIN" in ca_pem:
        certs, where = x509.load_pem_x509_certificates(ca_pem.encode()), "ca_pem"
    else:
        path = pathlib.Path(ca_pem)
        cas = x509.load_pem_x509_certificates(path.read_bytes())
        certs, where = list(cas), str(path.parent)
        for sibling in sorted(path.parent.iterdir()):
            if sibling == path or sibling.suffix not in (".crt", ".pem") or not sibling.is_file():
                continue
            try:
                found = x509.load_pem_x509_certificates(sibling.read_bytes())
            except ValueError:
                continue  # not a certificate
            certs += [c for c in found if any(issued_by(c, ca) for ca in cas)]
    if all(root(c) for c in certs):
        raise ValueError(
            f"no leaf or intermediate certificate in {where}: Chromium matches "
            "--ignore-certificate-errors-spki-list only against certificates the server sends, "
            "so pinning a root CA does nothing; pass the served certificate (tls.crt) or the CA's "
            "path with it beside it")
    return sorted({_spki(c) for c in certs})


_BOOT = """<!doctype html>
<meta charset="utf-8"><title>run_page</title>
<script>
(async () => {
  let out;
  try {
    const AsyncFunction = (async function () {}).constructor;
    const value = await new AsyncFunction(%(src)s)();
    out = {ok: true, value: value === undefined ? null : value};
  } catch (e) {
    out = {ok: false, error: String(e), name: e != null && e.name !== undefined ? String(e.name) : null};
  }
  let body;
  try {
    body = JSON.stringify(out);
  } catch (e) {
    body = JSON.stringify({ok: false, error: "result is not JSON: " + e, name: "TypeError"});
  }
  console.info(%(marker)s);  // run_page waits for this in the log: earlier messages are all in
  await fetch("/result", {method: "POST", headers: {"content-type": "application/json"}, body});
})();
</script>
"""

_RECORD = re.compile(r"^\[\d+:\d+:\d{4}/\d{6}\.\d+:[A-Z]+:")
_CONSOLE = re.compile(r"^\[[^\]]*:CONSOLE[^\]]*\] ?(.*)$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # Chromium stopped mid-request
            super().handle_error(request, client_address)


class PageResult(dict):
    """The page's result dict, plus `.console` (browser console messages) and `.log` (stderr)."""

    console: list[str]
    log: str

    def __repr__(self) -> str:
        lines = "".join(f"\n  console: {m}" for m in self.console)
        return f"{dict.__repr__(self)}{lines}"


def _console(lines: list[str]) -> list[str]:
    records: list[str] = []
    for line in lines:
        if _RECORD.match(line) or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    return [m.group(1) for r in records if (m := _CONSOLE.match(r))]


def _tail(lines: list[str], n: int = 40) -> str:
    useful = [l for l in lines if "dbus" not in l and "DBus" not in l]
    return "\n".join(useful[-n:])


def run_page(
    script_js: str,
    *,
    origin_port: int | None = None,
    host: str = "127.0.0.1",
    timeout: float = 60,
    ca_pem: str | None = None,
) -> PageResult:
    """Serves a page running `script_js` at http://{host}:{origin_port}/ in headless Chromium;
    returns what it reported. ca_pem: the test CA (PEM text or path; see _pins) to trust."""
    if origin_port is None:
        origin_port = _free_port() if _free_port else 0
    flags = list(FLAGS)
    if ca_pem is not None:
        flags.append("--ignore-certificate-errors-spki-list=" + ",".join(_pins(ca_pem)))
    marker = f"[run_page] done {os.urandom(8).hex()}"
    page = (_BOOT % {
        # As a JS string in the HTML: no "<" at all, so nothing can close or confuse the <script>.
        "src": json.dumps(script_js).replace("<", "\\u003c"),
        "marker": json.dumps(marker),
    }).encode()
    result: dict = {}
    got = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/":
                self._send(200, page, "text/html; charset=utf-8")
            else:
                self._send(404 if self.path != "/favicon.ico" else 204, b"", "text/plain")

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path != "/result":
                return self._send(404, b"", "text/plain")
            if not got.is_set():
                result.update(json.loads(body))
                got.set()
            self._send(204, b"", "text/plain")

        def _send(self, status, body, ctype):
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.send_header("cache-control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    bind = host if host[0].isdigit() else "127.0.0.1"  # "localhost": Chromium falls back to v4
    server = _Server((bind, origin_port), Handler)
    origin_port = server.server_address[1]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    profile = tempfile.TemporaryDirectory(prefix="corral-chromium-", ignore_cleanup_errors=True)
    flags.append(f"--user-data-dir={profile.name}")
    url = f"http://{host}:{origin_port}/"
    lines: list[str] = []
    proc = reader = None
    try:
        start = time.monotonic()
        proc = subprocess.Popen(
            [os.environ.get("CHROMIUM", "/usr/bin/chromium"), *flags, url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: _stop reaches every child
        )

        def drain():
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        while not got.wait(0.05):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"chromium exited with {proc.returncode} before {url} reported; stderr:\n"
                    + _tail(lines))
            if time.monotonic() - start > timeout:
                console = "\n".join(_console(list(lines))) or "(none)"
                raise TimeoutError(
                    f"{url} reported nothing in {timeout}s\nbrowser console:\n{console}\n"
                    f"chromium stderr (tail):\n{_tail(lines)}")
        # The page logs the marker just before posting, so once it is in the log, so is every
        # console message before it (e.g. the CORS error that made fetch() throw).
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(marker in l for l in list(lines)):
            time.sleep(0.02)
    finally:
        if proc is not None:
            _stop(proc)
        if reader is not None:
            reader.join(5)
        server.shutdown()
        server.server_close()
        profile.cleanup()
    out = PageResult(result)
    out.console = [m for m in _console(lines) if marker not in m]
    out.log = "\n".join(lines)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the browser, which then ends and reaps its own children (a SIGTERM to the whole
    group leaves them as zombies for init), then SIGKILL to whatever is left of its group."""
    try:
        proc.terminate()
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
