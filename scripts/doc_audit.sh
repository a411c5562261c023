#!/usr/bin/env bash
# Documentation audit (make test runs it). Fails when:
#  - an HTTP route or WS path has no section in docs/api.md with its semantics, a curl or
#    WebSocket example and example JSON (a route that serves files: its answer's headers);
#  - a RuntimeFlags variable is missing from docs/configuration.md;
#  - a Makefile target that README.md names (`make X`) does not exist;
#  - a relative link in docs/ or README.md is broken (file or #anchor).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=python3
exec "$py" scripts/doc_audit.py "$@"
