"""A pool of two Ollama nodes behind corral, with the real openai and ollama clients: a node that
dies is skipped without any client noticing (streams included) and is taken back when it
returns; model lists merge both nodes."""

import re
import subprocess
import time

import httpx
import pytest

from conftest import CORRAL, corral, free_port, gateway_config, serve, stop, wait_until
from test_clients import ollama_client, openai_client


def start_double(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [CORRAL, "double", "--listen", f"127.0.0.1:{port}", "--token-delay", "5ms", "--parallel", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().startswith("http://"), "the double did not start"
    # Warm, as a node that served before: corral prefers warm nodes, and both take turns.
    r = httpx.post(f"http://127.0.0.1:{port}/api/generate", json={"model": "llama3.2", "keep_alive": -1}, timeout=10)
    assert r.status_code == 200
    return proc


class Pool:
    def __init__(self, base, ca, metrics, ports, doubles, keys):
        self.base, self.ca, self.metrics, self.ports, self.doubles, self.keys = base, ca, metrics, ports, doubles, keys

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(f"{self.metrics}/metrics").text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
                total += float(m.group(2))
        return total



@pytest.fixture(scope="module")
def pool(tmp_path_factory, gateway):
    dir = tmp_path_factory.mktemp("pool")
    ports = {"a": free_port(), "b": free_port()}
    doubles = {n: start_double(p) for n, p in ports.items()}
    port, metrics = free_port(), free_port()
    nodes = "".join(f'[[upstream.nodes]]\nname = "{n}"\nurl = "http://127.0.0.1:{p}"\nparallel = 4\n' for n, p in ports.items())
    (dir / "corral.toml").write_text(gateway_config(gateway, port, metrics, f"""
{nodes}
[teams.research]
models = ["llama3.2:*", "nomic-embed-text*"]
"""))
    proc = serve(dir / "corral.toml", port)
    p = Pool(f"https://localhost:{port}", gateway.ca, f"http://127.0.0.1:{metrics}", ports, doubles, gateway.keys)
    wait_until("both nodes up", lambda: p.metric("corral_upstream_up") == 2)
    yield p
    stop(proc, *p.doubles.values())


def every_client_works(pool):
    r = openai_client(pool).chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content.startswith("The sky is blue")
    stream = openai_client(pool).chat.completions.create(
        model="llama3.2", stream=True, messages=[{"role": "user", "content": "Hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).startswith("The sky is blue")
    parts = list(ollama_client(pool).chat(model="llama3.2", stream=True, messages=[{"role": "user", "content": "Hi"}]))
    assert parts[-1].done and parts[-1].eval_count == 12
    assert ollama_client(pool).embed(model="nomic-embed-text", input="one").embeddings


def test_lists_merge_both_nodes_once(pool):
    names = [m.model for m in ollama_client(pool).list().models]
    assert names == ["llama3.2:latest", "nomic-embed-text:latest"], names
    assert [m.id for m in openai_client(pool).models.list()] == names


def test_a_dead_node_is_skipped_and_taken_back(pool):
    every_client_works(pool)
    pool.doubles["a"].kill()
    pool.doubles["a"].wait()
    for _ in range(4):
        every_client_works(pool)
    assert pool.metric("corral_upstream_attempts_total", node="a", outcome="failover") >= 1
    wait_until("a marked down", lambda: pool.metric("corral_upstream_up", node="a") == 0)
    every_client_works(pool)

    pool.doubles["a"] = start_double(pool.ports["a"])
    wait_until("a back", lambda: pool.metric("corral_upstream_up", node="a") == 1)
    served = pool.metric("corral_upstream_attempts_total", node="a", outcome="ok")

    def a_serves_again():
        every_client_works(pool)
        return pool.metric("corral_upstream_attempts_total", node="a", outcome="ok") > served

    wait_until("a serving again", a_serves_again)
