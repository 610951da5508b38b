#!/usr/bin/env bash
# Installs, with apt, the servers (PostgreSQL, Redis) the test suite runs against, and the browser (Chromium) its
# dashboard tests drive, when this machine lacks them.
# The tests start (and stop) their own instances; this script only makes the binaries available.
set -euo pipefail

need=()
# PostgreSQL: a reachable server on 127.0.0.1:5432 will do; otherwise the tests start their own
# cluster with initdb/pg_ctl, which must then be installed.
have_pg_binaries() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
pg_reachable() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if [ -n "${FRUGAL_TEST_POSTGRES_URL:-}" ] || pg_reachable || have_pg_binaries; then :; else need+=(postgresql); fi

# Redis: the tests always start their own redis-server on a free port (never touching another one).
command -v redis-server >/dev/null || need+=(redis-server)

# Chromium: the dashboard's browser tests (tests/test_dashboard.py) drive the system chromium through Playwright
# (Playwright's own browser downloads are never used).
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  echo "test services: nothing to install"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "test services: installing ${need[*]} with apt"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
