#!/usr/bin/env bash
# The test command: the whole suite, offline, against ../shared (or $OSP_EVAL_SHARED).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q --durations=15 "$@"
