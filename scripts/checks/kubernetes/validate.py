"""Offline validation of the Kubernetes manifests (run by scripts/checks/kubernetes.sh).

Every YAML document of every file given is checked:
- built-in kinds against the Kubernetes OpenAPI schemas bundled in kubernetes-validate, in
  strict mode (an undeclared field is an error, as with kubectl's default server-side field
  validation), for each --kube-version; a kind with no schema is an error, not a warning;
- prometheus-operator kinds (monitoring.coreos.com) are written to --crd-json for crd.mjs;
- references the schemas cannot see: a Service's selector matches some workload's pod labels
  and names a port it declares, a ServiceMonitor selects some Service and names its port;
- each ConfigMap key ending in .toml is written to --configs-to, for `credproxy check-config`.
"""

import argparse
import json
import os
import sys

import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError


def documents(path):
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc:
                yield doc


def name(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_templates(doc):
    spec = doc.get("spec", {})
    if doc.get("kind") == "Pod":
        return [(doc.get("metadata", {}), spec)]
    if doc.get("kind") == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template")
    return [(template.get("metadata", {}), template.get("spec", {}))] if template else []


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kube-version", action="append", required=True)
    ap.add_argument("--crd-json", required=True)
    ap.add_argument("--configs-to", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    errors = 0
    crds, docs = [], []
    for path in args.files:
        for doc in documents(path):
            docs.append((path, doc))
            if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                crds.append({"file": path, "doc": doc})
                continue
            for version in args.kube_version:
                try:
                    got = kubernetes_validate.validate(doc, version, strict=True)
                    print(f"INFO {path}: {name(doc)} passed (Kubernetes {got}, strict)")
                except ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    print(f"ERROR {path}: {name(doc)} (Kubernetes {e.version}): {where}: {e.message}")
                    errors += 1
                except SchemaNotFoundError as e:
                    print(f"ERROR {path}: {name(doc)}: {e.message}")
                    errors += 1

    # References between objects.
    pods = [(p, d, meta.get("labels", {}), spec) for p, d in docs for meta, spec in pod_templates(d)]
    services = [(p, d) for p, d in docs if d.get("kind") == "Service"]
    for path, svc in services:
        spec = svc.get("spec", {})
        matched = [(d, s) for _, d, labels, s in pods if selects(spec.get("selector"), labels)]
        if not matched:
            print(f"ERROR {path}: {name(svc)}: its selector matches no pod template here")
            errors += 1
        for port in spec.get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str):
                for d, s in matched:
                    containers = s.get("containers", []) + s.get("initContainers", [])
                    if not any(cp.get("name") == target for c in containers for cp in c.get("ports", [])):
                        print(f"ERROR {path}: {name(svc)}: targetPort {target} is no port of {name(d)}")
                        errors += 1
    for crd in crds:
        doc = crd["doc"]
        if doc.get("kind") != "ServiceMonitor":
            continue
        want = doc.get("spec", {}).get("selector", {}).get("matchLabels", {})
        hits = [s for _, s in services if selects(want, s.get("metadata", {}).get("labels", {}))]
        if not hits:
            print(f"ERROR {crd['file']}: {name(doc)}: its selector matches no Service here")
            errors += 1
        for ep in doc.get("spec", {}).get("endpoints", []):
            if ep.get("port") and not any(
                ep["port"] == p.get("name") for s in hits for p in s.get("spec", {}).get("ports", [])
            ):
                print(f"ERROR {crd['file']}: {name(doc)}: endpoint port {ep['port']} is no port of the Services it selects")
                errors += 1

    with open(args.crd_json, "w") as f:
        json.dump(crds, f)
    os.makedirs(args.configs_to, exist_ok=True)
    for path, doc in docs:
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith(".toml"):
                    stem = os.path.splitext(os.path.basename(path))[0]
                    out = os.path.join(args.configs_to, f"{stem}--{doc['metadata']['name']}--{key}")
                    with open(out, "w") as f:
                        f.write(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
