#!/usr/bin/env bash
# The OpenAPI contract, openapi/credproxy.json: it is a valid OpenAPI 3.1 document
# (openapi-spec-validator), and a real daemon answers what it says (schemathesis, against the
# loopback TCP listener of a daemon on a temporary directory, with a fixed seed and a bounded
# number of examples per operation). The integration tests check every answer they get
# against the same document (tests/common/contract.rs); this adds generated requests.
#
#   scripts/checks/openapi.sh        (needs target/debug/credproxy, or CREDPROXY_BIN)
#
# Environment: CREDPROXY_BIN (the binary), OPENAPI_MAX_EXAMPLES (per operation, default 25),
# OPENAPI_SEED (default 20261130).
set -euo pipefail
cd "$(dirname "$0")/../.."

spec=openapi/credproxy.json
bin="${CREDPROXY_BIN:-${CARGO_TARGET_DIR:-target}/debug/credproxy}"
max_examples="${OPENAPI_MAX_EXAMPLES:-25}"
seed="${OPENAPI_SEED:-20261130}"

# Pinned tools, in a virtualenv of their own under .peers/ (installed once, from PyPI).
venv=.peers/openapi-venv
schemathesis_version=4.32.5
validator_version=0.9.0
# (Outputs captured first: `grep -q` closing a pipe early would fail it under pipefail.)
installed="$("$venv/bin/schemathesis" --version 2>/dev/null || true)"
installed+=" $("$venv/bin/pip" show openapi-spec-validator 2>/dev/null | grep '^Version:' || true)"
if [ "$installed" != "schemathesis, version $schemathesis_version Version: $validator_version" ]; then
  echo "installing schemathesis $schemathesis_version and openapi-spec-validator $validator_version (pip, into $venv)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$schemathesis_version" "openapi-spec-validator==$validator_version"
fi

# (a) The document is valid OpenAPI 3.1.
"$venv/bin/openapi-spec-validator" "$spec"

# (b) A real daemon answers what the document says.
if [ ! -x "$bin" ]; then
  echo "no credproxy binary at $bin (cargo build, or set CREDPROXY_BIN)" >&2
  exit 1
fi
dir="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"
metrics_port="$(free_port)"
token="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
(umask 077; printf '%s' "$token" >"$dir/tcp.token")
cat >"$dir/credproxy.toml" <<EOF
[server]
socket = "$dir/api.sock"
request_timeout = "5s"
[server.tcp]
listen = "127.0.0.1:$port"
token_file = "$dir/tcp.token"
[metrics]
listen = "127.0.0.1:$metrics_port"
[store]
data_dir = "$dir/data"
master_key_file = "$dir/data/master.key"
generate_master_key = true
[log]
level = "warn"
# The TCP token holder may read, write and administer every workspace and environment.
[[access]]
tcp = true
environments = ["*"]
workspaces = ["*"]
write = true
admin = true
EOF
# Nothing here may leave the machine: any outbound HTTP the generated requests could cause (a
# token URL, a cloud SDK) goes to a closed local port instead.
HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY=127.0.0.1,localhost \
AWS_EC2_METADATA_DISABLED=true \
  "$bin" serve --config "$dir/credproxy.toml" >"$dir/daemon.log" 2>&1 &
pid=$!
# GET a path on the TCP listener (no curl needed): the body on stdout, failing unless 200.
fetch() {
  python3 -c 'import sys, urllib.request
r = urllib.request.Request(sys.argv[1], headers={"x-credproxy-token": sys.argv[2]})
sys.stdout.buffer.write(urllib.request.urlopen(r, timeout=5).read())' "http://127.0.0.1:$port$1" "$token"
}
for _ in $(seq 1 200); do
  if fetch /readyz >/dev/null 2>&1; then
    break
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "credproxy exited early:" >&2
    cat "$dir/daemon.log" >&2
    exit 1
  fi
  sleep 0.05
done
fetch /readyz >/dev/null || { echo "credproxy is not ready:" >&2; cat "$dir/daemon.log" >&2; exit 1; }

started=$SECONDS
status=0
# The daemon's own copy of the document is the one tested: it must be the committed one.
fetch /v1/openapi.json \
  | python3 -c 'import json, sys; assert json.load(sys.stdin) == json.load(open(sys.argv[1])), "the daemon serves another document"' "$spec"
# Run from the temporary directory: schemathesis keeps a cache (.schemathesis/) where it runs.
root="$PWD"
(cd "$dir" && "$root/$venv/bin/schemathesis" run "$root/$spec" \
  --url "http://127.0.0.1:$port" \
  -H "x-credproxy-token: $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,unsupported_method \
  --max-examples "$max_examples" --seed "$seed" --workers 1 \
  --generation-database none --no-color) || status=$?
echo "schemathesis took $((SECONDS - started))s"
if [ "$status" -ne 0 ]; then
  echo "--- daemon log (warnings and errors) ---" >&2
  tail -n 50 "$dir/daemon.log" >&2
fi
exit "$status"
