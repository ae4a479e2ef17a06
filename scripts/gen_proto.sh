#!/usr/bin/env bash
# Regenerate service/gen from proto/ and lint the contract (run after editing a .proto file).
#   scripts/gen_proto.sh          regenerate, then buf lint
#   scripts/gen_proto.sh --check  change nothing: fail if service/gen is stale or lint fails
# buf runs on a descriptor image built by grpcio-tools, since the googleapis imports come from
# the googleapis-common-protos package rather than from the Buf registry (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" == "--check" ]]; then
  "$PY" -m service.protogen --check
  "$PY" -m service.protogen --lint
  echo "service/gen is current; buf lint clean"
else
  "$PY" -m service.protogen
  "$PY" -m service.protogen --lint
  echo "service/gen regenerated; buf lint clean"
fi
