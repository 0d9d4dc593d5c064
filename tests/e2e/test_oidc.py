"""Single sign-on tokens ([auth.oidc.NAME]) from a real OpenID Provider (panva/oidc-provider,
tests/e2e/idp), obtained as a client would (client-credentials grant), used with the real openai
client; refusals, key rotation at the provider, a flood of unknown kids, and the provider down."""

import re
import ssl
import subprocess
import time
import uuid

import httpx
import openai
import pytest

from conftest import CORRAL, free_port, gateway_config, serve, stop, wait_until
from idp import make_jwk, mint, start_idp
from test_clients import openai_client

CLIENTS = [
    {"client_id": "ml-app", "client_secret": "ml-secret", "groups": ["staff", "ml-research"]},
    {"client_id": "ops-app", "client_secret": "ops-secret", "groups": "platform-admins"},
    {"client_id": "sales-app", "client_secret": "sales-secret", "groups": ["sales"]},
]


class Sso:
    def __init__(self, base, ca, keys, idp, key, metrics, log, proc):
        self.base, self.ca, self.keys, self.idp, self.key = base, ca, keys, idp, key
        self.metrics, self.log, self.proc = metrics, log, proc

    def metric(self, name, **labels):
        text = httpx.get(f"{self.metrics}/metrics").text
        sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
        m = re.search(rf"^{name}\{{{re.escape(sel)}\}} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def get(self, path, token):
        return httpx.get(f"{self.base}{path}", headers={"Authorization": f"Bearer {token}"},
                         verify=ssl.create_default_context(cafile=self.ca), timeout=30)


def config(gateway, issuer, port, metrics, audience="corral"):
    return gateway_config(gateway, port, metrics, revoked="revoked.txt", body=f"""
[upstream]
url = "{gateway.double_url}"

[auth.oidc.corp]
issuer = "{issuer}"
audience = "{audience}"
team_claim = "groups"
teams = {{ "platform-admins" = "ops", "ml-research" = "research", "staff" = "ops" }}

[teams.research]
models = ["llama3.2:*"]

[teams.ops]
models = ["*"]
admin = true
""")


def start(dir, gateway, issuer, port, metrics):
    (dir / "corral.toml").write_text(config(gateway, issuer, port, metrics))
    with open(dir / "access.log", "w") as log:
        return serve(dir / "corral.toml", port, stdout=log), dir / "access.log"


@pytest.fixture(scope="module")
def sso(tmp_path_factory, gateway):
    dir = tmp_path_factory.mktemp("oidc")
    key = make_jwk("ES256", "k1")
    idp = start_idp({"keys": [key]}, CLIENTS)
    port, metrics = free_port(), free_port()
    proc, log = start(dir, gateway, idp.issuer, port, metrics)
    s = Sso(f"https://localhost:{port}", gateway.ca, gateway.keys, idp, key, f"http://127.0.0.1:{metrics}", log, proc)
    wait_until("the provider's keys to load", lambda: s.metric("corral_oidc_jwks_up", issuer=idp.issuer) == 1)
    yield s
    stop(proc)
    idp.stop()



def claims(sso, **over):
    now = int(time.time())
    return {"iss": sso.idp.issuer, "aud": "corral", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex,
            "groups": ["ml-research"], **over}


def test_a_token_from_the_provider_works_with_the_real_openai_client(sso):
    token = sso.idp.token("ml-app", "ml-secret")
    client = openai_client(sso, api_key=token)
    r = client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content
    # Streaming too.
    chunks = list(client.chat.completions.create(model="llama3.2", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert len(chunks) > 1
    # The team is the first of the table the token's groups hold: `staff` maps to ops, but
    # ml-research comes first in the table.
    models = [m.id for m in client.models.list().data]
    assert models and all(m.startswith("llama3.2") for m in models), models
    # The access log names the team and the token's jti, never the token.
    wait_until("the access log", lambda: '"research"' in sso.log.read_text())
    text = sso.log.read_text()
    assert token not in text and token.split(".")[2] not in text
    assert '"team":"research"' in text.replace(" ", ""), text[-2000:]


def test_a_string_claim_maps_too_and_an_unmapped_group_is_forbidden(sso):
    ops = sso.idp.token("ops-app", "ops-secret")
    assert sso.get("/api/tags", ops).status_code == 200
    sales = sso.idp.token("sales-app", "sales-secret")
    with pytest.raises(openai.PermissionDeniedError) as e:
        openai_client(sso, api_key=sales).models.list()
    assert "no team" in str(e.value)


def test_wrong_audience_wrong_issuer_and_expired_tokens_are_refused(sso):
    other_aud = sso.idp.token("ml-app", "ml-secret", resource="other")
    stranger = start_idp({"keys": [make_jwk("ES256", "k1")]}, CLIENTS)
    try:
        other_iss = stranger.token("ml-app", "ml-secret")
    finally:
        stranger.stop()
    now = int(time.time())
    expired = mint(sso.key, claims(sso, iat=now - 7200, exp=now - 3600))
    for token, reason in [(other_aud, "wrong_audience"), (other_iss, "unknown_issuer"), (expired, "expired")]:
        with pytest.raises(openai.AuthenticationError) as e:
            openai_client(sso, api_key=token).models.list()
        assert e.value.status_code == 401, reason
        assert sso.metric("corral_auth_failures_total", reason=reason) >= 1, reason
    # A forged signature under the provider's kid.
    forged = mint(make_jwk("ES256", "k1"), claims(sso))
    assert sso.get("/api/tags", forged).status_code == 401


def test_a_key_rotation_at_the_provider_is_picked_up(sso):
    new = make_jwk("RS256", "k2")
    sso.idp.restart({"keys": [new, sso.key]})
    token = sso.idp.token("ml-app", "ml-secret")
    assert '"k2"' in __import__("base64").urlsafe_b64decode(token.split(".")[0] + "==").decode()
    # The first token under the new kid fetches the keys again (within the unknown-kid rate
    # limit; a test before this one may have used it up, so it may take one more interval).
    wait_until("the rotated key", lambda: sso.get("/api/tags", token).status_code == 200, timeout=30)


def test_a_flood_of_unknown_kids_does_not_hammer_the_provider(sso):
    before = sso.idp.jwks_fetches()
    started = time.monotonic()
    for _ in range(40):
        bogus = mint(make_jwk("ES256", "x"), claims(sso), kid=uuid.uuid4().hex)
        assert sso.get("/api/tags", bogus).status_code == 401
    took = time.monotonic() - started
    fetched = sso.idp.jwks_fetches() - before
    # At most one fetch per 10 s of flood (UNKNOWN_KID_INTERVAL), and one more if a scheduled
    # refresh fell in it.
    assert fetched <= 2 + int(took // 10), (fetched, took)
    assert sso.metric("corral_auth_failures_total", reason="unknown_kid") >= 40


def test_a_token_is_inspected_and_revoked_with_the_cli(sso):
    token = sso.idp.token("ml-app", "ml-secret")
    assert sso.get("/api/tags", token).status_code == 200
    config = str(sso.log.parent / "corral.toml")
    out = subprocess.run([CORRAL, "keys", "inspect", token, "--config", config], capture_output=True, text=True)
    assert out.returncode == 0 and "accepted" in out.stdout and "team research" in out.stdout, out
    assert f"issuer:  {sso.idp.issuer}" in out.stdout
    out = subprocess.run([CORRAL, "keys", "revoke", token, "--config", config], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    wait_until("the revocation to apply", lambda: sso.get("/api/tags", token).status_code == 401, timeout=30)
    assert sso.get("/api/tags", sso.idp.token("ml-app", "ml-secret")).status_code == 200, "only that token"


def test_a_reload_applies_a_new_audience_to_tokens_already_accepted(tmp_path, sso, gateway):
    port, metrics = free_port(), free_port()
    proc, _ = start(tmp_path, gateway, sso.idp.issuer, port, metrics)
    try:
        s = Sso(f"https://localhost:{port}", gateway.ca, gateway.keys, sso.idp, sso.key,
                f"http://127.0.0.1:{metrics}", None, proc)
        token = sso.idp.token("ml-app", "ml-secret")
        wait_until("the provider's keys", lambda: s.get("/api/tags", token).status_code == 200)
        (tmp_path / "corral.toml").write_text(config(gateway, sso.idp.issuer, port, metrics, audience="other"))
        wait_until("the reload", lambda: s.get("/api/tags", token).status_code == 401, timeout=30)
    finally:
        stop(proc)


def test_the_provider_going_down_does_not_affect_corral_keys_or_loaded_tokens(sso):
    token = sso.idp.token("ml-app", "ml-secret")
    assert sso.get("/api/tags", token).status_code == 200
    sso.idp.stop()
    assert sso.get("/api/tags", sso.keys["research"]).status_code == 200
    assert sso.get("/api/tags", token).status_code == 200, "keys that loaded are kept"
    # A token under a kid corral has not seen cannot be checked: refused, corral keys unaffected.
    bogus = mint(make_jwk("ES256", "x"), claims(sso), kid="never-seen")
    assert sso.get("/api/tags", bogus).status_code == 401
    assert sso.get("/api/tags", sso.keys["research"]).status_code == 200


def test_a_provider_down_at_start_gives_503_until_its_keys_load(tmp_path, gateway):
    key = make_jwk("EdDSA", "k1")
    port, metrics, idp_port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    proc, _ = start(tmp_path, gateway, issuer, port, metrics)
    try:
        s = Sso(f"https://localhost:{port}", gateway.ca, gateway.keys, None, key, f"http://127.0.0.1:{metrics}",
                None, proc)
        now = int(time.time())
        token = mint(key, {"iss": issuer, "aud": "corral", "iat": now, "exp": now + 300, "groups": "ml-research"})
        r = s.get("/api/tags", token)
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "identity provider" in r.json()["error"]
        assert s.get("/api/tags", gateway.keys["research"]).status_code == 200
        assert s.metric("corral_oidc_jwks_up", issuer=issuer) == 0
        check = [CORRAL, "check", "--config", str(tmp_path / "corral.toml")]
        out = subprocess.run(check, capture_output=True, text=True)
        assert out.returncode != 0 and "error    auth.oidc.corp:" in out.stdout, out
        idp = start_idp({"keys": [key]}, CLIENTS, port=idp_port)
        try:
            out = subprocess.run(check, capture_output=True, text=True)
            assert "ok       auth.oidc.corp: " in out.stdout and "1 signing key" in out.stdout, out
            wait_until("the provider's keys", lambda: s.get("/api/tags", token).status_code == 200, timeout=60)
            assert s.metric("corral_oidc_jwks_up", issuer=issuer) == 1
            assert s.metric("corral_oidc_jwks_refresh_total", issuer=issuer, outcome="error") >= 1
            assert s.metric("corral_oidc_jwks_refresh_total", issuer=issuer, outcome="ok") >= 1
        finally:
            idp.stop()
    finally:
        stop(proc)
