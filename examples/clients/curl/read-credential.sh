#!/usr/bin/env bash
# Read one credential from credproxy with curl and jq.
#
#   read-credential.sh --socket PATH [--field NAME] [--no-cache] [--retries N] [--max-wait SECONDS] ID
#
# With --field it prints that field's value to stdout (what a worker script consumes);
# without, the credential's field names only, never a value. Diagnostics go to stderr.
# Exit codes: 0 ok, 2 needs_reauth, 3 credential_unusable, 4 not found,
# 5 unavailable (503) after the retries, 1 other.
#
# A 503 (token_unavailable, store_unavailable, ...) is retried up to N times (default 3),
# each after its Retry-After capped at --max-wait (default 5) seconds. --no-cache sends
# Cache-Control: no-cache, for a caller whose upstream API just refused the value (a 401).
# Needs curl 7.84+ (for %header{} in -w) and jq. The answer stays in memory: no temp files.
set -euo pipefail

socket="${CREDPROXY_SOCKET:-}" field="" no_cache=0 retries=3 max_wait=5 id=""
say() { printf 'credproxy-client: %s\n' "$*" >&2; }
usage() {
  say "$1"
  echo "usage: read-credential.sh --socket PATH [--field NAME] [--no-cache] [--retries N] [--max-wait SECONDS] ID" >&2
  exit 1
}
while (($#)); do
  case "$1" in
    --socket) (($# > 1)) || usage "--socket needs a value"; socket="$2"; shift 2 ;;
    --field) (($# > 1)) || usage "--field needs a value"; field="$2"; shift 2 ;;
    --no-cache) no_cache=1; shift ;;
    --retries) [[ "${2:-}" =~ ^[0-9]+$ ]] || usage "--retries needs a whole number"; retries="$2"; shift 2 ;;
    --max-wait) [[ "${2:-}" =~ ^[0-9]+$ ]] || usage "--max-wait needs whole seconds"; max_wait="$2"; shift 2 ;;
    -*) usage "unknown option $1" ;;
    *) [ -z "$id" ] || usage "one credential id only"; id="$1"; shift ;;
  esac
done
[ -n "$socket" ] || usage "--socket (or \$CREDPROXY_SOCKET) is required"
[ -n "$id" ] || usage "the credential id is required"

url="http://credproxy/v1/credentials/$(jq -rn --arg v "$id" '$v|@uri')"
[ -z "$field" ] || url+="?fields=$(jq -rn --arg v "$field" '$v|@uri')"
headers=()
if ((no_cache)); then headers+=(-H 'Cache-Control: no-cache'); fi

attempt=0
while :; do
  # The body, then one last line: "<status> <Retry-After>" (the header is empty when absent).
  if ! answer="$(curl -sS --max-time 10 --unix-socket "$socket" ${headers[@]+"${headers[@]}"} \
      -w '\n%{http_code} %header{retry-after}' "$url")"; then
    say "cannot reach credproxy at $socket"
    exit 1
  fi
  trailer="${answer##*$'\n'}"
  body="${answer%$'\n'*}"
  read -r status retry_after <<<"$trailer" || true
  code="$(jq -r '.error.code // "unknown"' <<<"$body" 2>/dev/null || echo unknown)"

  case "$status" in
    200) break ;;
    503)
      if ((attempt < retries)); then
        attempt=$((attempt + 1))
        wait="${retry_after:-1}"
        [[ "$wait" =~ ^[0-9]+$ ]] || wait=1
        ((wait <= max_wait)) || wait="$max_wait"
        say "503 $code; retrying in ${wait}s"
        sleep "$wait"
        continue
      fi
      say "credential $id unavailable after $retries retries: $code (Retry-After: ${retry_after:-none})"
      exit 5 ;;
    409)
      case "$code" in
        needs_reauth) say "credential $id needs_reauth: the user must reconnect the account"; exit 2 ;;
        credential_unusable) say "credential $id credential_unusable: $(jq -r '.error.detail // .error.message' <<<"$body")"; exit 3 ;;
      esac ;;
    404) say "credential $id not found ($code)"; exit 4 ;;
  esac
  say "credential $id: $status $code: $(jq -r '.error.message // ""' <<<"$body" 2>/dev/null)"
  exit 1
done

if [ "$(jq -r '.needs_reauth' <<<"$body")" = true ]; then
  say "warning: credential $id needs re-authorisation; its token works until $(jq -r '.expires_at' <<<"$body")"
fi
if [ -n "$field" ]; then
  # -e: a missing field is an error, not the word "null".
  if ! jq -er --arg f "$field" '.secrets[$f] // empty' <<<"$body"; then
    say "credential $id has no field \"$field\""
    exit 1
  fi
else
  jq -r '.secrets | keys[]' <<<"$body"
fi
