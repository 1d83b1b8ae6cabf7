#!/usr/bin/env bash
# Prometheus rules and Grafana dashboard: the rules load (promtool check rules), their unit
# tests pass (promtool test rules), and every metric, label and outcome they and the dashboard
# use is one the daemon exports (scripts/checks/metric_names.py). No network, no daemon.
#
#   scripts/checks/prometheus.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "installing prometheus (apt) for promtool" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

promtool check rules deploy/prometheus/credproxy.rules.yml
promtool test rules deploy/prometheus/credproxy.rules.test.yml
# The dashboard's queries, written out as rules, so that promtool parses their PromQL too.
dashboard_rules="$(mktemp --suffix=.yml)"
trap 'rm -f "$dashboard_rules"' EXIT
python3 scripts/checks/metric_names.py --dashboard-rules "$dashboard_rules"
promtool check rules "$dashboard_rules" >/dev/null || {
  echo "deploy/grafana/credproxy.json: a query is not valid PromQL (see above)" >&2
  exit 1
}
echo "deploy/grafana/credproxy.json: every query parses"
