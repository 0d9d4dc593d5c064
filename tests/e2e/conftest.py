"""Fixtures: the real corral binary in front of the Ollama double, over TLS, on loopback."""

import os
import pathlib
import socket
import subprocess
import time

import pytest
import trustme

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORRAL = os.environ.get("CORRAL_BIN", str(ROOT / "target" / "debug" / "corral"))
_next_port = 24000 + (os.getpid() % 400) * 10


def free_port() -> int:
    """A free loopback port outside the ephemeral range (see tests/it/common/mod.rs)."""
    global _next_port
    while True:
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", _next_port))
                return _next_port
            except OSError:
                continue


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Gateway:
    def __init__(self, base, ca, dir, proc, double_url, keys):
        self.base = base
        self.ca = ca
        self.dir = dir
        self.proc = proc
        self.double_url = double_url
        # team name -> API key, issued with the real `corral keys issue`
        self.keys = keys


def corral(*args: str) -> str:
    """Runs the corral CLI; returns its stdout."""
    return subprocess.run([CORRAL, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def double_url():
    proc = subprocess.Popen(
        [CORRAL, "double", "--listen", "127.0.0.1:0", "--token-delay", "5ms"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, double_url):
    dir = tmp_path_factory.mktemp("corral")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(dir / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(dir / "tls.crt"))
    ca.cert_pem.write_to_path(str(dir / "ca.pem"))
    corral("keys", "init", "--dir", str(dir / "keys"), "--id", "e2e")
    signing = str(dir / "keys" / "e2e.key.pem")
    port, metrics = free_port(), free_port()
    (dir / "corral.toml").write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
tls_cert = "tls.crt"
tls_key = "tls.key"
metrics_listen = "127.0.0.1:{metrics}"

[upstream]
url = "{double_url}"

[auth]
verify_keys = ["keys/e2e.pub.pem"]
revoked_file = "revoked.txt"

[teams.research]
models = ["llama3.2:*", "nomic-embed-text*"]

[teams.ops]
models = ["*"]
admin = true

[teams.tiny]
models = ["llama3.2:*"]
rpm = 1
"""
    )
    # Issued as an operator would: against the gateway's configuration, which checks the team.
    config = str(dir / "corral.toml")
    keys = {t: corral("keys", "issue", "--signing-key", signing, "--team", t, "--config", config).strip()
            for t in ("research", "ops", "tiny")}
    proc = subprocess.Popen(
        [CORRAL, "serve", "--config", str(dir / "corral.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_port(port, proc)
    yield Gateway(f"https://localhost:{port}", str(dir / "ca.pem"), dir, proc, double_url, keys)
    proc.terminate()
    proc.wait()


def gateway_config(gateway, port: int, metrics: int | None, body: str, revoked: str = "") -> str:
    """A corral configuration on the session gateway's certificate and verification key: [server]
    on `port` (metrics on `metrics`, none for None), [auth] with the e2e key and the revocation
    list `revoked`, then `body` (upstream, teams, sub-tables such as [server.cors])."""
    metrics_listen = f"127.0.0.1:{metrics}" if metrics else ""
    return f"""
[server]
listen = "127.0.0.1:{port}"
tls_cert = "{gateway.dir / 'tls.crt'}"
tls_key = "{gateway.dir / 'tls.key'}"
metrics_listen = "{metrics_listen}"

[auth]
verify_keys = ["{gateway.dir / 'keys' / 'e2e.pub.pem'}"]
revoked_file = "{revoked}"
{body}"""


def serve(config: pathlib.Path, port: int, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """`corral serve --config CONFIG`, once it listens on `port`."""
    proc = subprocess.Popen([CORRAL, "serve", "--config", str(config)], stdout=stdout, stderr=subprocess.PIPE,
                            text=True)
    wait_port(port, proc)
    return proc


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait()


def wait_until(what: str, check, timeout: float = 60) -> None:
    """Polls `check` until it is true; a TimeoutError naming `what` after `timeout` seconds (a
    guard against hanging, never a pass condition)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"waited {timeout} s for {what}")
