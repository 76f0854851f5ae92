#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), lints (ruff, configured in pyproject.toml), then
# runs the whole test suite. The formatter's check is not enforced yet: `ruff format --check`
# reports what it would change.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
