#!/usr/bin/env bash
# `make test`: the PostgreSQL URL for the sweep tests, as .ci/run gets it — $RECSYS_TEST_POSTGRES if set, else a
# local server started by .ci/postgres.sh. Where none can be started, one line on stderr saying so and why, and an
# empty URL (the two PostgreSQL tests are then skipped; everything else runs).
set -uo pipefail
if [ -n "${RECSYS_TEST_POSTGRES:-}" ]; then echo "$RECSYS_TEST_POSTGRES"; exit 0; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if url=$("$(dirname "$0")/postgres.sh" 2>"$log") && [ -n "$url" ]; then
    echo "$url"
else
    why=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)
    echo "make test: no local PostgreSQL (.ci/postgres.sh: ${why:-failed}); the PostgreSQL sweep tests are skipped (set RECSYS_TEST_POSTGRES to a server's URL to run them)" >&2
fi
