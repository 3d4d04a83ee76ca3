"""Shape check of the cert-manager resources in examples/kubernetes/tls/, which
kubernetes-validate skips (custom resources have no schema there): every Certificate names a
Secret and an Issuer defined beside it, and every Secret the TLS pods mount is one of them.
Usage: cert-manager-check.py DIR; exits 1 with the reasons on a mismatch."""
import pathlib
import sys

import yaml

directory = pathlib.Path(sys.argv[1])
docs = [d for f in sorted(directory.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
issuers = {d["metadata"]["name"] for d in docs if d["kind"] == "Issuer"}
problems, secrets = [], set()
for cert in (d for d in docs if d["kind"] == "Certificate"):
    name, spec = cert["metadata"]["name"], cert.get("spec", {})
    allowed = {"secretName", "issuerRef", "isCA", "commonName", "duration", "renewBefore",
               "privateKey", "usages", "dnsNames", "uris", "ipAddresses"}
    problems += [f"Certificate {name}: unknown field spec.{k}" for k in spec if k not in allowed]
    if not spec.get("secretName"):
        problems.append(f"Certificate {name}: no spec.secretName")
    if spec.get("issuerRef", {}).get("name") not in issuers:
        problems.append(f"Certificate {name}: issuerRef names no Issuer here")
    secrets.add(spec.get("secretName"))
for doc in docs:
    if doc["kind"] in ("Deployment", "CronJob"):
        pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else \
            doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            secret = volume.get("secret", {}).get("secretName")
            if secret and secret not in secrets:
                problems.append(f"{doc['kind']} {doc['metadata']['name']}: mounts Secret {secret}, which no Certificate issues")
if not any(d["kind"] == "Certificate" for d in docs):
    problems.append("no Certificate")
print("\n".join(problems) or f"cert-manager resources: ok ({len(docs)} documents)")
sys.exit(1 if problems else 0)
