"""A real Prometheus scrapes a running corral after real traffic: the alert rules pass promtool,
and every PromQL expression of the Grafana dashboard parses, uses only metrics corral exports,
and returns data."""

import json
import re
import shutil
import ssl
import subprocess
import time
import urllib.parse

import httpx
import pytest
import trustme

from conftest import CORRAL, ROOT, corral, free_port, wait_port, wait_until

DASHBOARD = ROOT / "grafana" / "dashboards" / "corral.json"
ALERTS = ROOT / "grafana" / "alerts"


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (apt-get install prometheus); .ci/run installs it"
    return path


def start_double(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [CORRAL, "double", "--listen", f"127.0.0.1:{port}", "--token-delay", "2ms", "--failing-model", "flaky"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().startswith("http://"), "the double did not start"
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need("prometheus")
    dir = tmp_path_factory.mktemp("observability")
    double_port, port, metrics, prom_port = free_port(), free_port(), free_port(), free_port()
    procs = {"double": start_double(double_port)}
    # A shared state store, so its panels have calls to show.
    redis_port = free_port()
    procs["redis"] = subprocess.Popen(
        [need("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wait_port(redis_port, procs["redis"])
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(dir / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(dir / "tls.crt"))
    ca.cert_pem.write_to_path(str(dir / "ca.pem"))
    corral("keys", "init", "--dir", str(dir / "keys"), "--id", "obs")
    signing = str(dir / "keys" / "obs.key.pem")
    config = f"""
[server]
listen = "127.0.0.1:{port}"
tls_cert = "tls.crt"
tls_key = "tls.key"
metrics_listen = "127.0.0.1:{metrics}"
[upstream]
url = "http://127.0.0.1:{double_port}"
# Slots: requests wait in corral's line when both are taken (the Queue row).
parallel = 2
[state]
store = "redis://127.0.0.1:{redis_port}/0"
[auth]
verify_keys = ["keys/obs.pub.pem"]
revoked_file = "revoked.txt"
[teams.research]
models = ["llama3.2:*", "nomic-embed-text*", "flaky*"]
[teams.ops]
models = ["*"]
admin = true
[teams.tiny]
models = ["llama3.2"]
rpm = 1
[preload]
# qwen2.5:0.5b is not in the double: corral pulls it first (the dashboard's pull panel).
models = ["llama3.2", "nomic-embed-text", "qwen2.5:0.5b"]
watch_interval = "1s"
pull_missing = true
"""
    (dir / "corral.toml").write_text(config)
    keys = {t: corral("keys", "issue", "--signing-key", signing, "--team", t, "--config", str(dir / "corral.toml")).strip()
            for t in ("research", "ops", "tiny")}
    procs["corral"] = subprocess.Popen([CORRAL, "serve", "--config", str(dir / "corral.toml")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_port(port, procs["corral"])
    (dir / "prometheus.yml").write_text(
        f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {ALERTS / 'corral.rules.yml'}
scrape_configs:
  - job_name: corral
    static_configs:
      - targets: ["127.0.0.1:{metrics}"]
"""
    )
    procs["prometheus"] = subprocess.Popen(
        [need("prometheus"), f"--config.file={dir / 'prometheus.yml'}", f"--storage.tsdb.path={dir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wait_port(prom_port, procs["prometheus"])
    state = {
        "dir": dir, "base": f"https://localhost:{port}", "metrics": f"http://127.0.0.1:{metrics}",
        "prometheus": f"http://127.0.0.1:{prom_port}", "keys": keys, "double_port": double_port, "procs": procs,
    }
    yield state
    for p in procs.values():
        p.terminate()
        p.wait()


def query(stack, expr: str) -> dict:
    url = f"{stack['prometheus']}/api/v1/query?query={urllib.parse.quote(expr)}"
    return httpx.get(url, timeout=10).json()



def traffic(stack):
    """Requests that give every dashboard panel something to show."""
    tls = ssl.create_default_context(cafile=str(stack["dir"] / "ca.pem"))
    base = stack["base"]
    with httpx.Client(verify=tls, timeout=60) as c:
        def call(key, path, body):
            return c.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {key}"})

        research, ops = stack["keys"]["research"], stack["keys"]["ops"]
        chat = {"messages": [{"role": "user", "content": "why is the sky blue"}]}
        for _ in range(3):
            assert call(research, "/api/chat", {"model": "llama3.2", **chat}).status_code == 200
            assert call(ops, "/v1/chat/completions", {"model": "qwen2.5-coder:7b", "stream": True, **chat}).status_code == 200
            assert call(research, "/api/embed", {"model": "nomic-embed-text", "input": "a b c"}).status_code == 200
        assert call(research, "/api/chat", {"model": "flaky", **chat}).status_code == 200  # truncated stream
        assert c.get(f"{base}/api/tags", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert call(research, "/api/chat", {"model": "qwen2.5-coder:7b", **chat}).status_code == 403
        assert c.get(f"{base}/api/version").status_code == 200
        tiny = stack["keys"]["tiny"]
        assert call(tiny, "/api/chat", {"model": "llama3.2", **chat}).status_code == 200
        assert call(tiny, "/api/chat", {"model": "llama3.2", **chat}).status_code == 429
        # Ollama goes away and comes back: 502 and an upstream error meanwhile.
        stack["procs"]["double"].terminate()
        stack["procs"]["double"].wait()
        assert call(research, "/api/chat", {"model": "llama3.2", **chat}).status_code == 502
        stack["procs"]["double"] = start_double(stack["double_port"])
        assert call(research, "/api/chat", {"model": "llama3.2", **chat}).status_code == 200
    # A reload (the revocation list appears).
    (stack["dir"] / "revoked.txt").write_text("# no revoked keys\n")


def dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))

    walk(dash["panels"])
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"variable {v['name']}", v["definition"]))
    return out


def concrete(expr: str) -> str:
    """The dashboard's variables, as Grafana substitutes them."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "10m").replace("$__interval", "15s")
    return expr.replace('"$team"', '".*"').replace('"$model"', '".*"')


def exported_names(stack) -> set:
    text = httpx.get(f"{stack['metrics']}/metrics").text
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def test_alert_rules_pass_promtool():
    promtool = need("promtool")
    subprocess.run([promtool, "check", "rules", str(ALERTS / "corral.rules.yml")], check=True)
    subprocess.run([promtool, "test", "rules", "corral.rules.test.yml"], check=True, cwd=ALERTS)


def test_every_dashboard_query_parses_uses_corral_metrics_and_returns_data(stack):
    wait_until("Prometheus to scrape corral", lambda: query(stack, 'up{job="corral"} == 1')["data"]["result"])
    traffic(stack)
    requests = 'sum(corral_requests_total)'
    wait_until("Prometheus to see the traffic",
               lambda: (r := query(stack, requests)["data"]["result"]) and float(r[0]["value"][1]) >= 17)
    wait_until("a reload", lambda: query(stack, 'sum(corral_config_reloads_total{result="ok"}) > 0')["data"]["result"])
    time.sleep(2)  # two more scrapes, so rate() windows hold the last requests on both sides

    exported = exported_names(stack)
    problems = []
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    for title, expr in exprs:
        for name in re.findall(r"\b(corral_[a-z_]+)\b", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in exported and base not in exported:
                problems.append(f"{title}: {name} is not a metric corral exports")
        if expr.startswith("label_values("):
            continue
        answer = query(stack, concrete(expr))
        if answer.get("status") != "success":
            problems.append(f"{title}: does not parse: {answer.get('error')} in {expr}")
        elif not answer["data"]["result"]:
            problems.append(f"{title}: returns no data: {expr}")
    assert not problems, "\n".join(problems)


def test_prometheus_loads_the_rules_it_scrapes_against(stack):
    rules = httpx.get(f"{stack['prometheus']}/api/v1/rules").json()["data"]["groups"]
    names = {r["name"] for g in rules for r in g["rules"]}
    assert {"CorralUpstreamDown", "CorralHighErrorRatio", "CorralPinnedModelNotLoaded"} <= names
