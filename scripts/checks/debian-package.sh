#!/usr/bin/env bash
# The Debian package end to end: build it with cargo-deb (the deb-check profile: the release
# package without fat LTO), install it on this machine with dpkg, check what it installed and
# created, then purge it and check what is left. Needs root (dpkg); uses sudo when not root.
# Leaves the machine as it found it, also when a check fails; safe to run twice.
#
#   scripts/checks/debian-package.sh                 build with --profile deb-check, then check
#   CREDPROXY_DEB_PROFILE=release scripts/checks/debian-package.sh    the package users build
#   CREDPROXY_DEB_PREBUILT=1 scripts/checks/debian-package.sh   package target/debug/credproxy as
#                                                    built by the test run (what scripts/test.sh
#                                                    does: the packaging is checked, not the
#                                                    optimiser, without building it all twice)
#   CREDPROXY_DEB=path/to/credproxy.deb scripts/checks/debian-package.sh   check a built .deb
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf '==> %s\n' "$*"; }
fail() { printf 'debian-package: FAIL: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null \
    || fail "must run as root (dpkg -i / --purge), or with password-less sudo"
  SUDO=(sudo -n)
fi
as_root() { "${SUDO[@]}" "$@"; }

for tool in dpkg dpkg-query systemd-analyze systemd-sysusers systemd-tmpfiles deb-systemd-helper; do
  command -v "$tool" >/dev/null 2>&1 \
    || fail "$tool is missing (Debian packages dpkg, systemd, init-system-helpers)"
done

# A credproxy package this script did not install would be removed by the clean-up: refuse.
if dpkg-query -W -f='${db:Status-Status}' credproxy 2>/dev/null | grep -qv '^not-installed$'; then
  fail "a credproxy package is already installed here ($(dpkg-query -W -f='${Version} ${db:Status-Abbrev}' credproxy)); remove it first (dpkg --purge credproxy)"
fi
for path in /etc/credproxy /var/lib/credproxy /run/credproxy; do
  [ ! -e "$path" ] || fail "$path exists already; this check would mix its data with the package's"
done

# --- build -----------------------------------------------------------------------------------
cargo_deb_version=3.8.0
deb="${CREDPROXY_DEB:-}"
if [ -z "$deb" ]; then
  if ! .peers/cargo/bin/cargo-deb --version 2>/dev/null | grep -qxF "cargo-deb $cargo_deb_version"; then
    log "installing cargo-deb $cargo_deb_version (into .peers/cargo)"
    cargo install --locked --root .peers/cargo cargo-deb --version "$cargo_deb_version"
  fi
  profile="${CREDPROXY_DEB_PROFILE:-deb-check}"
  out="${CARGO_TARGET_DIR:-target}/debian-check"
  rm -rf "$out"
  # cargo-deb decides the file name; the only .deb in $out is it.
  if [ -n "${CREDPROXY_DEB_PREBUILT:-}" ]; then
    [ -x "${CARGO_TARGET_DIR:-target}/debug/credproxy" ] || fail "CREDPROXY_DEB_PREBUILT: no target/debug/credproxy (run cargo build first)"
    log "cargo deb --no-build --profile dev (the test run's binary)"
    # cargo-deb 3.8 warns that the dev profile is meant for releases only; it packages it.
    mkdir -p "$out"
    if ! .peers/cargo/bin/cargo-deb --locked --no-build --profile dev --fast -o "$out/" >"$out/cargo-deb.log" 2>&1; then
      cat "$out/cargo-deb.log" >&2
      fail "cargo deb failed"
    fi
    grep -v -e 'dev profile is not supported' -e 'debug symbols set' "$out/cargo-deb.log" || true
  else
    log "cargo deb --profile $profile"
    .peers/cargo/bin/cargo-deb --locked --profile "$profile" --fast -o "$out/"
  fi
  deb="$(ls "$out"/credproxy_*.deb)"
fi
[ -f "$deb" ] || fail "no package at $deb"

# --- clean-up, also when a check fails -------------------------------------------------------
cleanup() {
  local rc=$?
  set +e
  if [ -n "${serve_pid:-}" ] && kill -0 "$serve_pid" 2>/dev/null; then
    as_root kill -TERM "$serve_pid"; wait "$serve_pid"
  fi
  if dpkg-query -W -f='${db:Status-Status}' credproxy 2>/dev/null | grep -qv '^not-installed$'; then
    as_root dpkg --purge credproxy >/dev/null 2>&1
  fi
  # What purge keeps on purpose (see packaging/debian/postrm), and what the checks made.
  as_root rm -rf /etc/credproxy /var/lib/credproxy /run/credproxy
  [ -n "${scratch:-}" ] && as_root rm -rf "$scratch"
  # The package keeps its system user on purge (Debian practice); this check removes the one
  # its installation created, so that the machine is left as it was.
  if [ "$had_user" = 0 ] && getent passwd credproxy >/dev/null; then
    as_root userdel credproxy || echo "debian-package: could not remove the credproxy user" >&2
  fi
  if [ "$had_group" = 0 ] && getent group credproxy >/dev/null; then
    as_root groupdel credproxy || echo "debian-package: could not remove the credproxy group" >&2
  fi
  [ "$rc" -eq 0 ] || printf 'debian-package: FAILED (exit %s); the package was purged\n' "$rc" >&2
  exit "$rc"
}
had_user=0 had_group=0 serve_pid=""
if getent passwd credproxy >/dev/null; then had_user=1; fi
if getent group credproxy >/dev/null; then had_group=1; fi
scratch="$(mktemp -d)"
trap cleanup EXIT

# --- checks ----------------------------------------------------------------------------------
# Path, owner:group, octal mode.
expect_stat() {
  local got
  got="$(as_root stat -c '%U:%G %a' "$1" 2>/dev/null)" || fail "$1 does not exist"
  [ "$got" = "$2 $3" ] || fail "$1 is $got, expected $2 $3"
}

log "dpkg -i $(basename "$deb")"
as_root dpkg -i "$deb" >"$scratch/install.log" 2>&1 || { cat "$scratch/install.log" >&2; fail "dpkg -i"; }
cat "$scratch/install.log"
grep -qF 'credproxy keygen --out /etc/credproxy/master.key' "$scratch/install.log" \
  || fail "the postinst did not say how to create the master key"

log "installed files"
[ "$(dpkg-query -W -f='${db:Status-Status}' credproxy)" = installed ] || fail "credproxy is not installed"
unit=/usr/lib/systemd/system/credproxy.service
expect_stat /usr/bin/credproxy root:root 755
expect_stat /etc/credproxy root:root 755
expect_stat /etc/credproxy/credproxy.toml root:root 644
expect_stat "$unit" root:root 644
expect_stat /usr/lib/sysusers.d/credproxy.conf root:root 644
expect_stat /usr/lib/tmpfiles.d/credproxy.conf root:root 644
expect_stat /usr/share/doc/credproxy/README.md root:root 644
cmp -s "$unit" systemd/credproxy.service || fail "$unit is not systemd/credproxy.service"
dpkg-query -W -f='${Conffiles}\n' credproxy | grep -q '^ /etc/credproxy/credproxy.toml [0-9a-f]\{32\}$' \
  || fail "/etc/credproxy/credproxy.toml is not a conffile: $(dpkg-query -W -f='${Conffiles}' credproxy)"
/usr/bin/credproxy --version | grep -q '^credproxy ' || fail "credproxy --version"
dpkg-query -W -f='${Depends}\n' credproxy | grep -q 'systemd' || fail "the package does not depend on systemd"

log "user, group and directories"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd credproxy) || fail "no credproxy user"
getent group credproxy >/dev/null || fail "no credproxy group"
[ "$gid" = "$(getent group credproxy | cut -d: -f3)" ] || fail "credproxy's primary group is not credproxy"
sys_uid_max="$(awk '$1 == "SYS_UID_MAX" { print $2 }' /etc/login.defs)"
[ "$uid" -lt "${sys_uid_max:-1000}" ] || fail "credproxy (uid $uid) is not a system user"
[ "$shell" = /usr/sbin/nologin ] || fail "credproxy's shell is $shell, expected /usr/sbin/nologin"
[ "$home" = /var/lib/credproxy ] || fail "credproxy's home is $home"
expect_stat /var/lib/credproxy credproxy:credproxy 700
expect_stat /run/credproxy credproxy:credproxy 750

log "credproxy check-config on the installed configuration"
config=/etc/credproxy/credproxy.toml
if grep -q '^[[:space:]]*generate_master_key' "$config"; then fail "$config sets generate_master_key"; fi
grep -qx 'master_key_file = "/run/credentials/credproxy.service/master.key"' "$config" \
  || fail "$config does not read the master key from LoadCredential="
as_root /usr/bin/credproxy check-config --config "$config"
# As the service runs it: its user, CREDPROXY_CONFIG from the unit.
as_root setpriv --reuid=credproxy --regid=credproxy --clear-groups \
  env CREDPROXY_CONFIG="$config" /usr/bin/credproxy check-config >/dev/null

log "systemd-analyze verify and security"
# verify also checks that ExecStart= exists and that the unit's settings parse.
as_root systemd-analyze verify "$unit" >"$scratch/verify.log" 2>&1 \
  || { cat "$scratch/verify.log" >&2; fail "systemd-analyze verify $unit"; }
cat "$scratch/verify.log"
if grep -v 'Failed to connect to bus\|Failed to open /run/systemd' "$scratch/verify.log" | grep -q .; then
  fail "systemd-analyze verify $unit complained"
fi
level="$(systemd-analyze security --offline=yes "$unit" 2>&1 \
  | sed -n 's/.*Overall exposure level for credproxy.service: \([0-9.]*\).*/\1/p')"
[ -n "$level" ] || fail "no exposure level from systemd-analyze security"
# The same bound as tests/lifecycle.rs for systemd/credproxy.service.
awk -v l="$level" 'BEGIN { exit !(l <= 2.0) }' || fail "exposure $level > 2.0"
echo "exposure $level"

log "the daemon serves as the credproxy user with the installed configuration and directories"
# What the unit does, without systemd as PID 1: the key where LoadCredential= would put it
# (here a scratch copy), the user and group, the umask. Only the key path is swapped; the
# metrics port too if something here already listens on 9464 (or ss cannot tell).
as_root /usr/bin/credproxy keygen --out /etc/credproxy/master.key >/dev/null
expect_stat /etc/credproxy/master.key root:root 600
as_root install -d -o credproxy -g credproxy -m 0700 "$scratch/credentials"
as_root install -o credproxy -g credproxy -m 0400 /etc/credproxy/master.key "$scratch/credentials/master.key"
sed "s|^master_key_file = .*|master_key_file = \"$scratch/credentials/master.key\"|" "$config" >"$scratch/serve.toml"
if ! command -v ss >/dev/null 2>&1 || ss -ltnH 'sport = :9464' | grep -q .; then
  sed -i 's|^listen = "127.0.0.1:9464"|listen = "127.0.0.1:0"|' "$scratch/serve.toml"
  grep -q '127.0.0.1:0' "$scratch/serve.toml" || fail "could not move the metrics port"
fi
chmod 0644 "$scratch/serve.toml"
chmod 0755 "$scratch"
# Not through as_root: $! must be the daemon (setpriv and sh exec it), or sudo, which relays
# signals to it.
"${SUDO[@]}" setpriv --reuid=credproxy --regid=credproxy --init-groups \
  sh -c 'umask 0077; exec /usr/bin/credproxy serve --config "$1"' sh "$scratch/serve.toml" \
  >"$scratch/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 100); do
  [ -S /run/credproxy/credproxy.sock ] && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$scratch/serve.log" >&2; fail "credproxy serve exited"; }
  sleep 0.1
done
[ -S /run/credproxy/credproxy.sock ] || { cat "$scratch/serve.log" >&2; fail "no socket at /run/credproxy/credproxy.sock"; }
expect_stat /run/credproxy/credproxy.sock credproxy:credproxy 660
answer="$(as_root setpriv --reuid=credproxy --regid=credproxy --clear-groups \
  /usr/bin/credproxy get 00000000-0000-4000-8000-000000000000 --config "$config" 2>&1 || true)"
echo "$answer" | grep -q 'not_found\|not found' || { cat "$scratch/serve.log" >&2; fail "no answer through the socket: $answer"; }
as_root kill -TERM "$serve_pid"
wait "$serve_pid" || { cat "$scratch/serve.log" >&2; fail "credproxy serve did not exit 0 on SIGTERM"; }
[ ! -e /run/credproxy/credproxy.sock ] || fail "the socket was left behind"
expect_stat /var/lib/credproxy/credproxy.db credproxy:credproxy 600

log "reinstalling keeps a local edit of the conffile"
echo '# local edit' | as_root tee -a "$config" >/dev/null
as_root dpkg -i "$deb" >"$scratch/reinstall.log" 2>&1 || { cat "$scratch/reinstall.log" >&2; fail "dpkg -i again"; }
tail -n1 "$config" | grep -qx '# local edit' || fail "dpkg -i replaced the edited $config"
if grep -qF 'credproxy keygen' "$scratch/reinstall.log"; then fail "the postinst asked for a key that exists"; fi

# Purge, then check that nothing of the package is left but what purge keeps on purpose:
# /var/lib/credproxy and /etc/credproxy/master.key (the data and the key that decrypts it; see
# packaging/debian/postrm) and the credproxy user and group.
purge_and_check() {
  as_root dpkg --purge credproxy 2>&1 | tee "$scratch/purge.log"
  local status path
  status="$(dpkg-query -W -f='${db:Status-Status}' credproxy 2>/dev/null || true)"
  [ -z "$status" ] || [ "$status" = not-installed ] || fail "credproxy is still $status"
  for path in /usr/bin/credproxy "$unit" /usr/lib/sysusers.d/credproxy.conf \
      /usr/lib/tmpfiles.d/credproxy.conf /usr/share/doc/credproxy /etc/credproxy/credproxy.toml \
      /run/credproxy /etc/systemd/system/credproxy.service \
      /etc/systemd/system/multi-user.target.wants/credproxy.service \
      /var/lib/systemd/deb-systemd-helper-enabled/credproxy.service.dsh-also \
      /var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/credproxy.service \
      /var/lib/systemd/deb-systemd-helper-masked/credproxy.service; do
    [ ! -e "$path" ] && [ ! -L "$path" ] || fail "$path is left after purge"
  done
  [ "$(as_root ls -A /etc/credproxy)" = master.key ] \
    || fail "/etc/credproxy holds $(as_root ls -A /etc/credproxy | tr '\n' ' '), expected master.key only"
  as_root test -f /var/lib/credproxy/credproxy.db || fail "purge removed /var/lib/credproxy/credproxy.db"
  expect_stat /var/lib/credproxy credproxy:credproxy 700
  getent passwd credproxy >/dev/null || fail "purge removed the credproxy user"
  grep -qF 'its data was kept: /var/lib/credproxy /etc/credproxy/master.key' "$scratch/purge.log" \
    || fail "purge did not say what it kept"
}

log "dpkg --purge credproxy"
purge_and_check

log "installing again over the kept key and data: enabled on installation, no key asked for"
as_root dpkg -i "$deb" >"$scratch/again.log" 2>&1 || { cat "$scratch/again.log" >&2; fail "dpkg -i after purge"; }
if grep -qF 'credproxy keygen' "$scratch/again.log"; then fail "the postinst asked for a key that exists"; fi
[ -L /etc/systemd/system/multi-user.target.wants/credproxy.service ] \
  || fail "credproxy.service was not enabled although the master key exists"
as_root test -f /var/lib/credproxy/credproxy.db || fail "the kept database is gone"
expect_stat /var/lib/credproxy credproxy:credproxy 700

log "dpkg --remove, then --purge (enabled)"
as_root dpkg --remove credproxy >/dev/null
[ "$(dpkg-query -W -f='${db:Status-Status}' credproxy)" = config-files ] || fail "credproxy is not in config-files state"
[ ! -e /usr/bin/credproxy ] || fail "dpkg --remove left /usr/bin/credproxy"
[ -f /etc/credproxy/credproxy.toml ] || fail "dpkg --remove removed the conffile"
[ "$(readlink /etc/systemd/system/credproxy.service)" = /dev/null ] || fail "the unit was not masked on remove"
purge_and_check

log "debian-package: all checks passed"
