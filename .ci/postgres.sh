#!/usr/bin/env bash
# Start a PostgreSQL server on 127.0.0.1 for the sweep tests (Debian packages; installed if missing) and print
# its URL. Usage: export RECSYS_TEST_POSTGRES=$(.ci/postgres.sh)
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
version=$(ls /etc/postgresql | sort -n | tail -1)
if [ -z "$version" ] || [ ! -d "/etc/postgresql/$version/main" ]; then
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_createcluster "$version" main >&2
fi
pg_ctlcluster "$version" main start >&2 2>/dev/null || true   # already running is fine
for _ in $(seq 30); do pg_isready -h 127.0.0.1 -q && break; sleep 1; done
runuser -u postgres -- psql -q -h 127.0.0.1 -d postgres -c "SELECT 1" >/dev/null 2>&1 || \
    runuser -u postgres -- psql -q -d postgres -c "SELECT 1" >/dev/null
runuser -u postgres -- psql -q -d postgres -tc "SELECT 1 FROM pg_roles WHERE rolname='recsys'" | grep -q 1 || \
    runuser -u postgres -- psql -q -d postgres -c "CREATE ROLE recsys LOGIN PASSWORD 'recsys'" >&2
runuser -u postgres -- psql -q -d postgres -tc "SELECT 1 FROM pg_database WHERE datname='recsys'" | grep -q 1 || \
    runuser -u postgres -- psql -q -d postgres -c "CREATE DATABASE recsys OWNER recsys" >&2
echo "postgresql://recsys:recsys@127.0.0.1:5432/recsys"
