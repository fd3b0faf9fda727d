#!/usr/bin/env bash
# Installs sluice as a systemd service.
#
#   sudo systemd/install.sh                 # builds with cargo, then installs
#   sudo SLUICE_BIN=/path/to/sluice systemd/install.sh
#
# Never overwrites an existing /etc/sluice/sluice.toml or keys.txt.
# DESTDIR=/some/root installs below that folder instead (used by the tests);
# SKIP_USER=1 skips creating the system user, SKIP_SYSTEMCTL=1 skips daemon-reload.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
root="${DESTDIR:-}"

bin="${SLUICE_BIN:-}"
if [ -z "$bin" ]; then
  echo "building sluice (release)..."
  (cd "$repo" && cargo build --release --locked)
  bin="$repo/target/release/sluice"
fi
[ -x "$bin" ] || { echo "no executable at $bin" >&2; exit 1; }

if [ -z "${SKIP_USER:-}" ] && ! id sluice >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /var/lib/sluice --shell /usr/sbin/nologin sluice
  echo "created system user sluice"
fi
group=sluice
id -g sluice >/dev/null 2>&1 || group="$(id -gn)"

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system"
install -d -m 0750 "$root/etc/sluice"
install -m 0755 "$bin" "$root/usr/local/bin/sluice"
install -m 0644 "$here/sluice.service" "$root/etc/systemd/system/sluice.service"

# Config and keys: only when absent, readable by root and the sluice group only.
install_once() {
  local from="$1" to="$2"
  if [ -e "$to" ]; then
    echo "kept existing $to"
  else
    install -m 0640 "$from" "$to"
    chgrp "$group" "$to" 2>/dev/null || true
    echo "installed $to"
  fi
}
# The installed config reads the installed keys file (the repo's example
# leaves it commented out: the file does not exist next to it).
sed 's|^# keys_file = "keys.txt"|keys_file = "keys.txt"    |' "$repo/config/sluice.toml" >"$root/etc/sluice/.sluice.toml.new"
install_once "$root/etc/sluice/.sluice.toml.new" "$root/etc/sluice/sluice.toml"
rm -f "$root/etc/sluice/.sluice.toml.new"
install_once "$repo/config/keys.txt.example" "$root/etc/sluice/keys.txt"
chgrp "$group" "$root/etc/sluice" 2>/dev/null || true

if [ -z "${SKIP_SYSTEMCTL:-}" ] && [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
  systemctl daemon-reload
fi

cat <<TXT

sluice is installed. Next:
  1. Edit /etc/sluice/sluice.toml (upstreams, models, client keys) and
     /etc/sluice/keys.txt (upstream keys, one a line).
  2. Put the secrets the config reads as \${VAR} in /etc/sluice/env (mode 0640):
       OPENAI_API_KEY=sk-...        # the provider key (or list keys in keys.txt)
       CLIENT_KEY=...               # a key your clients send (sluice init makes one)
       ADMIN_TOKEN=...              # for /admin/*, at least 8 characters
  3. Check it:    sluice check -c /etc/sluice/sluice.toml
  4. Start it:    systemctl enable --now sluice
  5. Rotate keys: edit keys.txt, then systemctl reload sluice
     (the reload checks the files first; a broken one fails and changes nothing)
TXT
