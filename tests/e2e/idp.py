"""A real OpenID Provider for the end-to-end tests: tests/e2e/idp/idp.mjs (panva/oidc-provider).

Needs Node and `npm ci --prefix tests/e2e/idp`. Not a fixture module: tests build their own.

    from idp import make_jwk, mint, start_idp

    key = make_jwk("ES256", "k1")
    idp = start_idp({"keys": [key]}, [{"client_id": "app", "client_secret": "s", "groups": ["red"]}])
    token = idp.token("app", "s")                 # a JWT with aud "corral"
    forged = mint(key, {"iss": idp.issuer, "aud": "corral", "exp": 1})   # signed by the IdP's key
    idp.restart({"keys": [make_jwk("RS256", "k2")]})                     # key rotation, same issuer
    idp.stop()
"""

import base64
import json
import pathlib
import shutil
import subprocess
import tempfile
import urllib.parse

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

IDP_DIR = pathlib.Path(__file__).resolve().parent / "idp"


def make_jwk(alg: str, kid: str) -> dict:
    """A fresh private JWK for "RS256", "ES256" or "EdDSA" (Ed25519), with kid, alg and use."""
    if alg == "RS256":
        jwk = RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048), as_dict=True)
    elif alg == "ES256":
        jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
    elif alg == "EdDSA":
        jwk = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate(), as_dict=True)
    else:
        raise ValueError(f"unsupported alg {alg!r}")
    # PyJWT adds key_ops ["sign"] to RSA keys; the IdP would publish that on the public key.
    jwk.pop("key_ops", None)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def mint(jwk: dict, claims: dict, kid: str | None = None) -> str:
    """A JWT over `claims`, signed by the private `jwk` with its alg, headed like the IdP's
    tokens (typ at+jwt); `kid` overrides the key's kid in the header (e.g. an unknown one)."""
    key = jwt.PyJWK(jwk).key
    headers = {"kid": kid if kid is not None else jwk["kid"], "typ": "at+jwt"}
    return jwt.encode(claims, key, algorithm=jwk["alg"], headers=headers)


def public_jwks(jwks: dict) -> dict:
    """The public half of a private key set (what the IdP publishes at its jwks_uri)."""
    private = {"d", "p", "q", "dp", "dq", "qi", "oth"}
    return {"keys": [{k: v for k, v in key.items() if k not in private} for key in jwks["keys"]]}


class Idp:
    """One `node idp.mjs` process. Restarting keeps port and issuer; the JWKS counter restarts at 0."""

    def __init__(self, jwks: dict, clients: list[dict], port: int, ttl: int = 300):
        self.clients = clients
        self.ttl = ttl
        self.port = port
        self._start(jwks)

    def _start(self, jwks: dict) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not on PATH; the test IdP needs Node 20+")
        if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError(f"{IDP_DIR}/node_modules is missing: run `npm ci --prefix tests/e2e/idp`")
        self.jwks = jwks
        self.dir = tempfile.TemporaryDirectory(prefix="corral-idp-")
        config = pathlib.Path(self.dir.name) / "config.json"
        config.write_text(json.dumps({"port": self.port, "jwks": jwks, "clients": self.clients, "ttl": self.ttl}))
        # stderr to a file: nobody reads a pipe while the tests run, and a full pipe would block node.
        self.log = pathlib.Path(self.dir.name) / "stderr.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [node, str(IDP_DIR / "idp.mjs"), str(config)],
                stdout=subprocess.PIPE, stderr=err, text=True,
            )
        # The one line it prints once listening; empty if it died first (e.g. port in use, bad key).
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://127.0.0.1:"):
            self.proc.wait()
            log = self.log.read_text()
            self.dir.cleanup()
            raise RuntimeError(f"the IdP did not start ({self.proc.returncode}): {log}")
        self.issuer = line
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.proc.stdout.close()
        self.dir.cleanup()

    def restart(self, jwks: dict) -> None:
        """The same IdP (port, issuer, clients) signing and publishing another key set."""
        self.stop()
        self._start(jwks)

    def discovery(self) -> dict:
        return httpx.get(f"{self.issuer}/.well-known/openid-configuration").raise_for_status().json()

    def token(self, client_id: str, client_secret: str, resource: str | None = "corral") -> str:
        """A client-credentials grant over HTTP; the access token (a JWT) with aud `resource`.
        None sends no resource indicator (the IdP then defaults to corral)."""
        form = {"grant_type": "client_credentials"}
        if resource is not None:
            # RFC 8707 resource indicators are absolute URIs; the IdP maps urn:X to aud X.
            form["resource"] = f"urn:{resource}"
        headers = {}
        method = next(
            (c.get("token_endpoint_auth_method") for c in self.clients if c["client_id"] == client_id), None
        )
        if method == "client_secret_post":
            form.update(client_id=client_id, client_secret=client_secret)
        else:
            # RFC 6749 2.3.1: form-encode each part before base64 (httpx's auth= does not).
            q = urllib.parse.quote_plus
            basic = base64.b64encode(f"{q(client_id)}:{q(client_secret)}".encode()).decode()
            headers["authorization"] = f"Basic {basic}"
        r = httpx.post(f"{self.issuer}/token", data=form, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"token request failed: {r.status_code} {r.text}")
        return r.json()["access_token"]

    def jwks_fetches(self) -> int:
        """How many times this process served its JWKS."""
        return httpx.get(f"{self.issuer}/_test/jwks_fetches").raise_for_status().json()["count"]


def start_idp(jwks: dict, clients: list[dict], port: int | None = None, ttl: int = 300) -> Idp:
    """Starts the IdP. port None: a free port outside the ephemeral range (so a restart on it
    cannot collide with some outgoing connection); 0: any port the OS picks."""
    if port is None:
        try:
            from conftest import free_port  # tests/e2e/conftest.py, on sys.path under pytest
        except ImportError:
            port = 0
        else:
            port = free_port()
    return Idp(jwks, clients, port, ttl)
