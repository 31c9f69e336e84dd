#!/usr/bin/env bash
# The test command (README, CI): creates .venv if absent, installs megacca with the pinned CPU stack, runs pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
