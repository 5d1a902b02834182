#!/usr/bin/env bash
# GPU: one lighteval configuration on the full local data (after stage.sh staged lighteval's wheels -- and vLLM's
# for --backend vllm --, the data and the GGUF). Usage: [MODEL=1p4b|8b] lighteval_suite.sh NAME TASKS TIMEOUT_S
# [lighteval_ptq.py flags...]. MODEL=1p4b / 8b evaluates the random OSP-1.4B / Llama-3-8B-shaped model instead of
# SmolLM2-135M.
# Summaries accumulate in /tmp/lres (the whole folder comes back as a tarball, without per-sample details).
set -uo pipefail
source benchmarks/gpu/_setup.sh
if [ "${MODEL:-}" = 1p4b ]; then
  [ -f /tmp/osp14b/config.json ] || python3 benchmarks/gpu/make_random_1p4b.py /tmp/osp14b $M 2>&1 | tail -1
  M=/tmp/osp14b
elif [ "${MODEL:-}" = 8b ]; then  # the random Llama-3-8B shape (16 GB written once per machine)
  [ -f /tmp/llama8b/config.json ] || python3 benchmarks/gpu/make_random_1p4b.py /tmp/llama8b $M llama3-8b 2>&1 | tail -1
  M=/tmp/llama8b
fi
NAME=$1 TASKS=$2 LIMIT=$3; shift 3
echo "== $NAME $TASKS $*"; t0=$SECONDS
timeout $LIMIT python3 lighteval_ptq.py $M "$@" --tasks "$TASKS" --data_dir /tmp/ldata --batch_size 64 --gen_batch_size 256 \
  --output_dir /tmp/lres/$NAME --no_progress 2>&1 | grep -v -i -E "warn|deprecat" | grep -E -v "^\(|INFO" | tail -22
echo "   ($((SECONDS-t0)) s)"
cd /tmp/lres && find . -name "*.json" -path "*lighteval*" | tar czf $OUT/lighteval_results.tgz -T - && ls -la $OUT
