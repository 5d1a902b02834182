#!/usr/bin/env bash
# GPU: one lighteval configuration of SmolLM2-135M on the full local data (after stage.sh staged lighteval's
# wheels, the data and the GGUF). Usage: lighteval_suite.sh NAME TASKS TIMEOUT_S [lighteval_ptq.py flags...]
# Summaries accumulate in /tmp/lres (the whole folder comes back as a tarball, without per-sample details).
set -uo pipefail
source benchmarks/gpu/_setup.sh
NAME=$1 TASKS=$2 LIMIT=$3; shift 3
echo "== $NAME $TASKS $*"; t0=$SECONDS
timeout $LIMIT python3 lighteval_ptq.py $M "$@" --tasks "$TASKS" --data_dir /tmp/ldata --batch_size 64 --gen_batch_size 256 \
  --output_dir /tmp/lres/$NAME --no_progress 2>&1 | grep -v -i -E "warn|deprecat" | tail -22
echo "   ($((SECONDS-t0)) s)"
cd /tmp/lres && find . -name "*.json" -path "*lighteval*" | tar czf $OUT/lighteval_results.tgz -T - && ls -la $OUT
