"""Waiting for a slot, seen by the real clients: with Ollama's slots (`parallel`) taken, a full
line is a 429 and a wait past scheduler.queue_timeout a 503, each with Retry-After, which the
openai SDK raises as RateLimitError / InternalServerError and the ollama client as ResponseError
with the status."""

import re
import ssl
import subprocess
import threading
import time

import httpx
import ollama
import openai
import pytest

from conftest import CORRAL, free_port, gateway_config, serve, stop, wait_until
from test_clients import ollama_client, openai_client


class Gateway:
    def __init__(self, base, ca, metrics, keys):
        self.base, self.ca, self.metrics, self.keys = base, ca, metrics, keys

    def waiting(self, team: str) -> float:
        text = httpx.get(f"{self.metrics}/metrics").text
        m = re.search(rf'^corral_queue_depth\{{team="{team}"\}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def line(tmp_path_factory, gateway):
    dir = tmp_path_factory.mktemp("queue")
    # One token a second: a stream holds its slot for 12 s unless the test lets it go.
    double_port, port, metrics = free_port(), free_port(), free_port()
    double = subprocess.Popen([CORRAL, "double", "--listen", f"127.0.0.1:{double_port}", "--token-delay", "1s"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert double.stdout.readline().startswith("http://")
    (dir / "corral.toml").write_text(gateway_config(gateway, port, metrics, f"""
[upstream]
url = "http://127.0.0.1:{double_port}"
parallel = 1

[scheduler]
queue_timeout = "2s"

[teams.research]
models = ["llama3.2:*"]
max_queued = 1

[teams.ops]
models = ["*"]
"""))
    proc = serve(dir / "corral.toml", port)
    yield Gateway(f"https://localhost:{port}", gateway.ca, f"http://127.0.0.1:{metrics}", gateway.keys)
    stop(proc, double)


def hold_the_slot(gw):
    """A stream of team ops that holds the one slot while the context is open."""
    client = httpx.Client(verify=ssl.create_default_context(cafile=gw.ca), timeout=30)
    stream = client.stream("POST", f"{gw.base}/api/generate", json={"model": "llama3.2", "prompt": "hold"},
                           headers={"Authorization": f"Bearer {gw.keys['ops']}"})
    resp = stream.__enter__()
    assert resp.status_code == 200
    # Kept alive: a line iterator that is dropped closes its response.
    lines = resp.iter_lines()
    next(lines)
    return client, stream, lines



def test_the_real_clients_see_a_full_line_and_a_timeout(line):
    client, stream, _lines = hold_the_slot(line)
    try:
        outcome = {}

        def waits():
            try:
                openai_client(line).chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
            except Exception as e:  # noqa: BLE001 - the test inspects what the SDK raised
                outcome["error"] = e

        waiter = threading.Thread(target=waits)
        waiter.start()
        wait_until("one request in line", lambda: line.waiting("research") == 1 or "error" in outcome)
        assert "error" not in outcome, repr(outcome)

        # The team's line holds one: the next is refused at once.
        with pytest.raises(openai.RateLimitError) as full:
            openai_client(line).chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
        assert full.value.status_code == 429
        assert full.value.response.headers["retry-after"] == "5"
        assert full.value.code == "queue_full"
        with pytest.raises(ollama.ResponseError) as full:
            ollama_client(line).chat(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
        assert full.value.status_code == 429
        assert "waiting" in full.value.error

        # The one in line gives up after queue_timeout: a server error the SDK may retry.
        waiter.join(timeout=30)
        error = outcome.get("error")
        assert isinstance(error, openai.InternalServerError), repr(error)
        assert error.status_code == 503
        assert error.response.headers["retry-after"] == "5"
        with pytest.raises(ollama.ResponseError) as timed_out:
            ollama_client(line).generate(model="llama3.2", prompt="Hi")
        assert timed_out.value.status_code == 503
        assert "busy" in timed_out.value.error
    finally:
        stream.__exit__(None, None, None)
        client.close()
    # The slot is free again: the clients work as before.
    r = ollama_client(line).generate(model="llama3.2", prompt="Hi", options={"num_predict": 1})
    assert r.done
