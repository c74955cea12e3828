# Sourced by scripts/demo and scripts/test: make ./.venv with the project installed (editable)
# and the given extras, pinned by constraints.txt. Uses only Python 3.11+; on Debian without
# python3-venv it installs it. TOKENSMITH_VENV and PYTHON choose another venv and interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TOKENSMITH_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$PYTHON" -m venv "$VENV"
    else
      echo "python3 -m venv failed: install python3-venv (Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
extras="${1:-}"
stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)-${extras:-none}"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT${extras:+[$extras]}"
  touch "$stamp"
fi
