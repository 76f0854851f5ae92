#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then runs the pipeline on the bundled clip with
# configs/demo.yaml. Extra arguments go to `finestream run` (e.g. --model dfine_n_coco.pth).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/finestream run configs/demo.yaml "$@"
