#!/usr/bin/env bash
# Creates .venv and installs the project into it. Safe to re-run: it only installs what changed.
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh test     runtime + test dependencies (and Debian's chromium for the browser test)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

# pip's configuration here lists local package folders that may be absent; it warns about each
# one for every package. Drop those lines, keep everything else pip says.
pip_install() {
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip_install --upgrade pip
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
# torch is pinned (2.13.0, CPU build) in pyproject.toml.
pip_install -e ".${extras}"
# Kokoro's English, Mandarin and other native voices: only the kokoro sdist on PyPI ships them.
# Fetched through pip, hash-pinned, each file sha256-checked (tts_core/embedded/voice_pack.py).
.venv/bin/python -m tts_core.embedded.voice_pack \
  2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)

if [ "${1:-}" = "test" ] && [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing Debian's chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
