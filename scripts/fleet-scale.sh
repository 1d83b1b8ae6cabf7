#!/usr/bin/env bash
# Fleet mode at scale (issue #18): one PostgreSQL cluster and N real credproxy daemons on this
# machine; reports connections held (idle and peak under load), writes per second while idle
# (per table and per statement, from pg_stat_statements), invalidation latency, token requests
# per lifetime of a rotating OAuth token read by all N, and resident memory. Minutes long, so
# not part of the default test run (tests/fleet_scale.rs keeps a 10-instance check there).
#
#   scripts/fleet-scale.sh [N] [REPORT.json]
#
#   N            instances (default 200; or CREDPROXY_SCALE_N)
#   REPORT.json  where the figures go as JSON too (or CREDPROXY_SCALE_REPORT; default none)
#
# Other knobs (environment): CREDPROXY_SCALE_IDLE_SECS, the idle window writes are measured
# over (60); CREDPROXY_SCALE_MAX_CONNECTIONS, PostgreSQL's max_connections (2500).
# Builds in release mode through scripts/test.sh (which installs PostgreSQL, the OAuth test
# server and the rest); each daemon needs a few file descriptors and PostgreSQL one process per
# connection, so the open-files limit is raised first. Needs about 15 MB of memory per
# instance plus PostgreSQL's backends (a few MB each).
set -euo pipefail
cd "$(dirname "$0")/.."

export CREDPROXY_SCALE_N="${1:-${CREDPROXY_SCALE_N:-200}}"
if [ -n "${2:-}" ]; then
  export CREDPROXY_SCALE_REPORT="$2"
fi

want=$((CREDPROXY_SCALE_N * 40 + 4096))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want" ]; then
  hard="$(ulimit -Hn)"
  if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then want="$hard"; fi
  ulimit -n "$want"
fi
echo "==> fleet scale: $CREDPROXY_SCALE_N instances (open files: $(ulimit -n))"

exec scripts/test.sh -- cargo test --release --test fleet_scale -- --ignored --nocapture --exact scale_fleet
