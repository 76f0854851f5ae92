#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), lints and checks the formatting (ruff, configured
# in pyproject.toml; `ruff format .` fixes the latter), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
exec .venv/bin/python -m pytest "$@"
