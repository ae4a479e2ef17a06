#!/usr/bin/env bash
# One command for a fresh machine: install everything, then run Envoy + the gRPC server with the
# embedded engine. Extra arguments go to the launcher (see `python -m gateway --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m gateway "$@"
