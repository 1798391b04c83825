#!/usr/bin/env bash
# Makes sure the PostgreSQL server binaries (initdb, postgres, pgbench) are on
# this machine. Installs Debian's postgresql package when running as root and
# they are missing; otherwise says exactly what to install. Starts no server:
# tests and the demo start their own throwaway cluster.
set -euo pipefail
have() {
  local d
  d=$(pg_config --bindir 2>/dev/null || true)
  [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && return 0
  command -v initdb >/dev/null 2>&1 && return 0
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && return 0
  done
  return 1
}
if [ -n "${SHADOWCTL_TEST_DSN:-}" ] || have; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure-postgres: no PostgreSQL server binaries found; installing Debian's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql postgresql-contrib >/dev/null
  # Debian starts a cluster on install where it can; the project runs its own.
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    for c in $(pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2}'); do
      pg_ctlcluster ${c%/*} ${c#*/} stop >/dev/null 2>&1 || true
    done
  fi
  have && exit 0
fi
cat >&2 <<'MSG'
ensure-postgres: no PostgreSQL server binaries (initdb, postgres) were found.
Install them, then run the command again:
  Debian/Ubuntu:  sudo apt-get install -y postgresql      (PostgreSQL 15 or newer)
  Fedora/RHEL:    sudo dnf install -y postgresql-server
  macOS:          brew install postgresql@15
or point the tests at a server you own: export SHADOWCTL_TEST_DSN=postgres://user@host/db
MSG
exit 1
