"""Keys as operators handle them with standard tools: the secret-scanner rule the README gives
finds an issued key (and only a whole one), and Python's `cryptography` reads the signing key."""

import pathlib
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import ROOT


def readme_rule() -> re.Pattern:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- secret-scanner-rule -->")[1].split("<!-- /secret-scanner-rule -->")[0]
    regex = re.search(r"regex = '''(.+?)'''", block).group(1)
    keywords = re.search(r"keywords = \[\"(.+?)\"\]", block).group(1)
    return re.compile(regex), keywords


def test_the_readmes_secret_scanner_rule_finds_issued_keys(gateway):
    rule, keyword = readme_rule()
    for team, key in gateway.keys.items():
        leaked = f'client = OpenAI(api_key="{key}")\n'
        found = rule.search(leaked)
        assert found and found.group(0) == key, team
        # gitleaks only runs a rule on text holding one of its keywords (lowercased).
        assert keyword in leaked.lower()
    key = gateway.keys["research"]
    assert not rule.search(key.removeprefix("corral_")), "an unprefixed JWT is not a corral key"
    assert not rule.search(key[:-10]), "a cut-off key does not match as a whole one"


def test_python_cryptography_reads_the_signing_key(gateway):
    pem = pathlib.Path(gateway.dir / "keys" / "e2e.key.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public == pathlib.Path(gateway.dir / "keys" / "e2e.pub.pem").read_bytes()
