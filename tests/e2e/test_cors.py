"""Browser pages on other origins ([server.cors]), in a real headless Chromium: a page from an
allowed origin streams a chat through corral with fetch() and reads a 429's Retry-After; a page
from any other origin is blocked by the browser. Raw preflights check the exact answers."""

import http.client
import json
import ssl

import pytest

from browser import run_page
from conftest import free_port, gateway_config, serve, stop


class Site:
    def __init__(self, base, port, ca, keys, allowed_port, other_port):
        self.base, self.port, self.ca, self.keys = base, port, ca, keys
        self.allowed_port, self.other_port = allowed_port, other_port
        self.allowed = f"http://127.0.0.1:{allowed_port}"


@pytest.fixture(scope="module")
def site(tmp_path_factory, gateway):
    dir = tmp_path_factory.mktemp("cors")
    port, allowed_port, other_port = free_port(), free_port(), free_port()
    (dir / "corral.toml").write_text(gateway_config(gateway, port, None, f"""
[server.cors]
origins = ["http://127.0.0.1:{allowed_port}", "chrome-extension://abcdefghijklmnop"]
max_age = "10m"

[upstream]
url = "{gateway.double_url}"

[teams.research]
models = ["llama3.2:*"]

[teams.tiny]
models = ["llama3.2:*"]
rpm = 1
"""))
    proc = serve(dir / "corral.toml", port)
    yield Site(f"https://localhost:{port}", port, gateway.ca, gateway.keys, allowed_port, other_port)
    stop(proc)


def request(site_or_gateway, method, path, headers, body=None):
    """One raw request over TLS; returns (status, headers as a lowercase dict, body)."""
    ctx = ssl.create_default_context(cafile=site_or_gateway.ca)
    port = int(site_or_gateway.base.rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


STREAM_AND_429 = """
const chat = (key) => fetch(GATEWAY + "/v1/chat/completions", {
  method: "POST",
  headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json",
            "x-stainless-os": "Linux", "x-stainless-retry-count": "0"},
  body: JSON.stringify({model: "llama3.2", stream: true,
                        messages: [{role: "user", content: "count to ten"}]}),
});
const res = await chat(RESEARCH);
const reader = res.body.getReader();
const decoder = new TextDecoder();
let chunks = 0, text = "";
for (;;) {
  const {done, value} = await reader.read();
  if (done) break;
  chunks += 1;
  text += decoder.decode(value, {stream: true});
}
await (await chat(TINY)).text();
const limited = await chat(TINY);
return {status: res.status, chunks, done: text.includes("[DONE]"),
        request_id: res.headers.get("x-request-id"),
        limited: limited.status, retry_after: limited.headers.get("retry-after"),
        limited_body: await limited.json()};
"""


def page(site, script):
    return ("const GATEWAY = " + json.dumps(site.base) + ";\n"
            + "const RESEARCH = " + json.dumps(site.keys["research"]) + ";\n"
            + "const TINY = " + json.dumps(site.keys["tiny"]) + ";\n" + script)


def test_a_page_from_an_allowed_origin_streams_a_chat_and_reads_a_429s_retry_after(site):
    r = run_page(page(site, STREAM_AND_429), origin_port=site.allowed_port, ca_pem=site.ca)
    assert r["ok"], r
    v = r["value"]
    assert v["status"] == 200 and v["done"], v
    assert v["chunks"] > 1, f"the stream came in one piece: {v}"
    assert v["request_id"], "x-request-id is exposed to the page"
    assert v["limited"] == 429 and v["retry_after"] is not None and int(v["retry_after"]) >= 1, v
    assert v["limited_body"]["error"]["code"] == "rate_limited", v


def test_a_page_from_another_origin_is_blocked_by_the_browser(site):
    r = run_page(page(site, STREAM_AND_429), origin_port=site.other_port, ca_pem=site.ca)
    assert not r["ok"] and r["name"] == "TypeError", r
    assert any("CORS policy" in line for line in r.console), r


PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, cookie"}


def test_a_preflight_from_an_allowed_origin_is_answered_by_corral_without_a_key(site):
    status, h, body = request(site, "OPTIONS", "/v1/chat/completions",
                              {"Origin": site.allowed, **PREFLIGHT})
    assert status == 204 and body == b"", (status, body)
    assert h["access-control-allow-origin"] == site.allowed
    assert h["access-control-allow-methods"] == "POST"
    assert h["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert h["access-control-max-age"] == "600"
    assert "origin" in h["vary"]
    # The same for an extension's origin, on an Ollama route.
    status, h, _ = request(site, "OPTIONS", "/api/chat",
                           {"Origin": "chrome-extension://abcdefghijklmnop", **PREFLIGHT})
    assert status == 204 and h["access-control-allow-origin"] == "chrome-extension://abcdefghijklmnop"


@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1:1", "null",
                                    "http://127.0.0.1:{allowed}.evil.example"])
def test_a_preflight_from_any_other_origin_gets_no_cors_headers(site, origin):
    origin = origin.format(allowed=site.allowed_port)
    status, h, body = request(site, "OPTIONS", "/v1/chat/completions", {"Origin": origin, **PREFLIGHT})
    assert status == 403, (status, body)
    assert not any(k.startswith("access-control-") for k in h), h
    assert b"server.cors.origins" in body


def test_a_preflight_for_a_route_or_method_corral_does_not_serve_is_refused(site):
    status, _, _ = request(site, "OPTIONS", "/api/nope", {"Origin": site.allowed, **PREFLIGHT})
    assert status == 404
    status, h, _ = request(site, "OPTIONS", "/api/chat",
                           {"Origin": site.allowed, "Access-Control-Request-Method": "PUT"})
    assert status == 405 and "access-control-allow-methods" not in h


def test_answers_to_an_allowed_origin_carry_cors_headers_errors_included(site):
    # A refused key (401): the page can read why.
    status, h, _ = request(site, "POST", "/api/chat", {"Origin": site.allowed, "Authorization": "Bearer nope",
                                                         "Content-Type": "application/json"}, body="{}")
    assert status == 401
    assert h["access-control-allow-origin"] == site.allowed
    assert "retry-after" in h["access-control-expose-headers"]
    assert "x-request-id" in h["access-control-expose-headers"]
    # Another origin's request is answered (browsers enforce CORS, not servers) but without them.
    status, h, _ = request(site, "GET", "/api/tags", {"Origin": "https://evil.example",
                                                        "Authorization": f"Bearer {site.keys['research']}"})
    assert status == 200 and "access-control-allow-origin" not in h
    assert "origin" in h["vary"].lower()


def test_without_server_cors_nothing_changes(gateway):
    status, h, _ = request(gateway, "OPTIONS", "/v1/chat/completions",
                           {"Origin": "http://127.0.0.1:9", **PREFLIGHT})
    assert status == 405
    assert not any(k.startswith("access-control-") for k in h), h
    status, h, _ = request(gateway, "GET", "/api/tags", {"Origin": "http://127.0.0.1:9",
                                                           "Authorization": f"Bearer {gateway.keys['research']}"})
    assert status == 200 and "access-control-allow-origin" not in h and "vary" not in h
