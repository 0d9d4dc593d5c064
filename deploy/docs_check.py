"""What the README says about deployment, checked against the files it describes.

Usage: python3 deploy/docs_check.py RENDERED_DIR
RENDERED_DIR holds `<overlay>.yaml` for every overlay, as `kubectl kustomize` renders it.
Each check prints what it compared; any mismatch fails with the README's words and the file's.
"""

import pathlib
import re
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
problems = []


def check(ok, what):
    print(("ok      " if ok else "MISMATCH") + "  " + what)
    if not ok:
        problems.append(what)


def section(text, heading):
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end != -1 else len(text)]


readme = (ROOT / "README.md").read_text()
k8s = section(readme, "### Kubernetes")
systemd = section(readme, "### systemd")
rendered = {
    p.stem: [d for d in yaml.safe_load_all(p.read_text()) if d]
    for p in pathlib.Path(sys.argv[1]).glob("*.yaml")
}


def objects(overlay, kind):
    return [d for d in rendered[overlay] if d["kind"] == kind]


# Namespaces: every `kubectl -n NS` in the README is an overlay's namespace, and the production
# steps use production's.
namespaces = {name: {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} - {None}
              for name, docs in rendered.items()}
for name, ns in namespaces.items():
    check(len(ns) == 1, f"overlay {name} puts everything in one namespace: {sorted(ns)}")
said = set(re.findall(r"kubectl (?:-n|--namespace) ([a-z0-9-]+)", k8s))
said |= set(re.findall(r"kubectl create namespace ([a-z0-9-]+)", k8s))
known = set().union(*namespaces.values())
check(said and said <= known, f"README's namespaces {sorted(said)} are the overlays' {sorted(known)}")
check("corral" in namespaces["production"] and "kubectl -n corral create secret generic corral-verify-keys" in k8s,
      "the production Secret command uses the production namespace")
check("kubectl -n corral-dev create secret tls corral-tls" in k8s and "corral-dev" in namespaces["dev"],
      "the dev TLS Secret command uses the dev namespace")

# The Certificate: the host and issuer the README tells you to change are the overlay's.
cert = objects("production", "Certificate")
check(len(cert) == 1, "production renders one Certificate")
if cert:
    host, issuer = cert[0]["spec"]["dnsNames"], cert[0]["spec"]["issuerRef"]
    check(f"`{host[0]}`" in k8s and f"ClusterIssuer `{issuer['name']}`" in k8s,
          f"README names the Certificate's host {host} and ClusterIssuer {issuer['name']!r}")
check("overlays/production/kustomization.yaml" in k8s, "README says where to change them")

# The Prometheus Operator's `release` label on both monitoring objects, with the README's value.
release = re.search(r"`release: ([a-z0-9-]+)`", k8s)
check(release is not None, "README names the release label")
for kind in ("ServiceMonitor", "PrometheusRule"):
    objs = objects("production", kind)
    labels = objs[0]["metadata"].get("labels", {}) if objs else {}
    check(bool(objs) and release and labels.get("release") == release.group(1),
          f"production's {kind} carries release: {labels.get('release')}")

# The dashboard ConfigMap: labelled for the sidecar, in the namespace the README says to watch.
dash = [d for d in rendered["production"] if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "corral-grafana-dashboard"]
check(bool(dash) and dash[0]["metadata"]["labels"].get("grafana_dashboard") == "1"
      and 'labelled `grafana_dashboard: "1"`' in k8s, "the dashboard ConfigMap has the label the README names")
check(bool(dash) and dash[0]["metadata"]["namespace"] == "corral" and "searchNamespace" in k8s
      and "ConfigMap is in `corral`" in k8s, "README says the sidecar must watch the dashboard's namespace")

# The image the README names is the base's, at the crate's version.
cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]
deployments = objects("production", "Deployment")
image = deployments[0]["spec"]["template"]["spec"]["containers"][0]["image"] if deployments else ""
check(image == f"ghcr.io/corral-gateway/corral:{cargo['version']}" and f"`{image}`" in k8s,
      f"README's image is the rendered one: {image}")

# The revocation list: the ConfigMap the README names feeds the pods' file, without a name hash.
revoked = [d for d in rendered["production"] if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "corral-revoked"]
check(bool(revoked) and "revoked.txt" in revoked[0].get("data", {}) and "`corral-revoked`" in k8s,
      "the ConfigMap corral-revoked (no name hash) carries revoked.txt")
toml = tomllib.loads((ROOT / "config/kubernetes.toml").read_text())
check(toml["auth"]["revoked_file"] in k8s, f"README names the pods' list {toml['auth']['revoked_file']}")
check(toml["preload"].get("pull_missing") is True and toml["preload"]["ready_requires_preload"] is True,
      "the Kubernetes config pulls missing pinned models and gates readiness on them, as the README says")

# systemd: the Ollama drop-in keeps Ollama on loopback and filters no egress.
dropin = (ROOT / "deploy/systemd/ollama.service.d/corral.conf").read_text()
settings = [l.strip() for l in dropin.splitlines() if l.strip() and not l.lstrip().startswith("#")]
egress = [l for l in settings if l.split("=")[0] in ("IPAddressDeny", "IPAddressAllow", "RestrictNetworkInterfaces", "IPEgressFilterPath")]
check(not egress, f"the Ollama drop-in filters no outgoing traffic (model downloads): {egress}")
check('Environment="OLLAMA_HOST=127.0.0.1:11434"' in settings and "`127.0.0.1:11434`" in systemd,
      "the Ollama drop-in binds Ollama to loopback, as the README says")

# Licence and project URLs agree.
license_text = (ROOT / "LICENSE").read_text()
check(cargo["license"] == "Apache-2.0" and "Apache License" in license_text and "Version 2.0" in license_text,
      "LICENSE is the Apache-2.0 text Cargo.toml declares")
unit = (ROOT / "deploy/systemd/corral.service").read_text()
doc = re.search(r"^Documentation=(\S+)", unit, re.M).group(1)
check(doc == cargo["repository"] and "corral-gateway" in image,
      f"the unit's Documentation= ({doc}) is Cargo.toml's repository and the image's organisation")

if problems:
    sys.exit(f"{len(problems)} README statement(s) do not match the deployment files")
print("README and deployment files agree")
