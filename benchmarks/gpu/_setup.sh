# Sourced by the GPU suites (after `stage.sh .gpu/p1` put the GGUF's first half in /tmp/gg): the gguf wheel, the
# environment, and SmolLM2-135M converted to a bf16 HF folder in $M (skipped when a warm machine has it).
[ -d /tmp/py/site-packages/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/py/site-packages .gpu/whl/*.whl
export PYTHONPATH=/tmp/py/site-packages:$PWD OSP_EVAL_DATA=$PWD/.gpu/data HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
M=/tmp/SmolLM2-135M
if [ ! -f $M/config.json ]; then
  G=/tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf
  P2=/tmp/gg/smol.gguf.part_ab; [ -f $P2 ] || P2=.gpu/p2/smol.gguf.part_ab
  cat /tmp/gg/smol.gguf.part_aa $P2 > $G && sha256sum $G
  python3 benchmarks/gpu/gguf_to_hf.py $G $M 2>&1 | tail -1
fi
