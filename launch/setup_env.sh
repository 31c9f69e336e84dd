#!/usr/bin/env bash
# Create .venv (if absent) and install megacca into it. CPU machines get the pinned CPU stack
# (requirements/cpu.txt: torch 2.13.0 CPU wheel, megatron-core 0.16.1); a machine with a CUDA torch already
# importable by `python3` keeps it (the venv sees the system site-packages) and installs the rest.
set -euo pipefail
case "${1:-}" in
  -h|--help) cat <<'EOF'
usage: bash launch/setup_env.sh

Creates .venv (if absent) and installs megacca into it: the pinned CPU stack (requirements/cpu.txt) on a
CPU machine; with a CUDA torch already importable by python3 (or PYTHON), the venv reuses it. Does
nothing when the install is up to date.
EOF
    exit 0 ;;
  "") ;;
  *) echo "setup_env.sh: takes no arguments (--help)" >&2; exit 2 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
stamp=.venv/.megacca-installed
want="$(cat setup.py requirements/cpu.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "[setup] CUDA torch found: the venv reuses the system site-packages" >&2
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip > /dev/null
if .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -r requirements/cpu.txt -e ".[test]"
fi
echo "$want" > "$stamp"
