#!/usr/bin/env bash
# One command for a fresh machine: install everything the tests need, then run lint and tests.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check .

echo "== buf lint + generated code is current"; scripts/gen_proto.sh --check
echo "== pytest"; exec python -m pytest -q -rs "$@"
