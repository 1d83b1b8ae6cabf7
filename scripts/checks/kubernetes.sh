#!/usr/bin/env bash
# Validates every manifest in deploy/kubernetes offline: no cluster, no network but the
# package registries for the first install.
#
# - Built-in kinds: strict schema validation (undeclared fields are errors) with the OpenAPI
#   schemas bundled in kubernetes-validate (PyPI, pinned), against Kubernetes 1.29 (the oldest
#   with native sidecars -- restartPolicy on init containers -- on by default) and 1.33.
# - ServiceMonitor (a CRD): the schema @kubernetes-models/prometheus-operator (npm, pinned by
#   scripts/checks/kubernetes/package-lock.json) generates from the operator's API types, plus
#   an unknown-field check (scripts/checks/kubernetes/crd.mjs).
# - Cross-references: Service -> pod labels and port names, ServiceMonitor -> Service.
# - `credproxy check-config` on every .toml embedded in a ConfigMap: CREDPROXY_BIN, else
#   target/debug/credproxy; skipped with a message when neither exists.
#
#   scripts/checks/kubernetes.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf '==> %s\n' "$*"; }

kube_versions=(1.29.0 1.33.0)
validate_pin='kubernetes-validate==1.37.0'

venv=.peers/k8s-venv
if ! "$venv/bin/python" -c 'import kubernetes_validate.version as v, sys; sys.exit(v.__version__ != "1.37.0")' 2>/dev/null; then
  log "installing $validate_pin (pip, into $venv)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$validate_pin"
fi

node_dir=.peers/k8s-node
if ! cmp -s scripts/checks/kubernetes/package-lock.json "$node_dir/package-lock.json" \
   || [ ! -d "$node_dir/node_modules/@kubernetes-models/prometheus-operator" ]; then
  log "installing @kubernetes-models/prometheus-operator (npm ci, into $node_dir)"
  mkdir -p "$node_dir"
  cp scripts/checks/kubernetes/package.json scripts/checks/kubernetes/package-lock.json "$node_dir/"
  (cd "$node_dir" && npm ci --silent --no-audit --no-fund)
fi
# ES modules resolve packages from the importing file's directory: run the checker from there.
cp scripts/checks/kubernetes/crd.mjs "$node_dir/crd.mjs"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

manifests=(deploy/kubernetes/*.yaml)
version_args=()
for v in "${kube_versions[@]}"; do version_args+=(--kube-version "$v"); done

status=0
log "kubernetes schemas (${kube_versions[*]}): ${manifests[*]}"
"$venv/bin/python" scripts/checks/kubernetes/validate.py "${version_args[@]}" \
  --crd-json "$tmp/crds.json" --configs-to "$tmp/config" "${manifests[@]}" || status=1

log "prometheus-operator schema: ServiceMonitor"
if [ "$(cat "$tmp/crds.json" 2>/dev/null || echo '[]')" = "[]" ]; then
  echo "ERROR no monitoring.coreos.com resource found (servicemonitor.yaml missing?)"; status=1
else
  node "$node_dir/crd.mjs" <"$tmp/crds.json" || status=1
fi

bin="${CREDPROXY_BIN:-${CARGO_TARGET_DIR:-target}/debug/credproxy}"
log "credproxy check-config on the ConfigMaps' configs"
if [ ! -x "$bin" ]; then
  echo "SKIP $bin not found (cargo build, or set CREDPROXY_BIN): configs not checked"
else
  for config in "$tmp"/config/*.toml; do
    [ -e "$config" ] || { echo "ERROR no .toml key in any ConfigMap"; status=1; break; }
    # check-config reads the file only (no key, password or socket is touched).
    "$bin" check-config --config "$config" || status=1
  done
fi

exit "$status"
