#!/usr/bin/env bash
# GPU command 2 of 2 (after `stage.sh .gpu/p1` put the GGUF's first half in /tmp/gg): SmolLM2-135M at full size.
# Carry: .gpu/whl (gguf wheel), .gpu/data (WikiText-2 test, C4 sample), .gpu/p2 (the GGUF's second half).
set -uo pipefail
R=$OUT/res; mkdir -p "$R"
source benchmarks/gpu/_setup.sh
step() { echo "== $*"; local t0=$SECONDS; "$@" --output_dir "$R" --no_progress 2>&1 | grep -E "ppl =|kurtosis|error|Error|cells|^\|" | head -40; echo "   ($((SECONDS-t0)) s)"; }
step python3 -m osp_eval ppl $M
step python3 -m osp_eval table $M --bits 4-4-4 --methods rtn,ffn_had,gptq,quarot --calib_data c4
step bash scripts/4_eval_ppl_quarot.sh $M 4 4 4 --w_rtn
step bash scripts/1_eval_ppl_rtn.sh $M 4 16 16
step python3 -m osp_eval ppl $M --w_bits 4 --calib_data c4
step bash scripts/4_eval_ppl_quarot.sh $M 16 16 16 --w_rtn
step bash scripts/4_eval_ppl_quarot.sh $M 16 16 16 --w_rtn --no-center_embeddings
step bash scripts/4_eval_ppl_quarot.sh $M 4 4 4 --calib_data c4 --no-center_embeddings
step python3 -m osp_eval kurtosis $M --mode both
step python3 -m osp_eval kurtosis $M --mode both --rotate --w_rtn --no-center_embeddings
step python3 -m osp_eval outliers $M
echo "== bench_ppl"; python3 benchmarks/bench_ppl.py --model $M --data_dir .gpu/data --nwindows 1000 --methods fp,rtn,ffn_had,quarot_rtn --repeats 1 2>&1 | grep -v Warn | tail -7
cp benchmarks/results/bench_ppl_SmolLM2-135M_cuda.json "$R"/ 2>/dev/null
tar czf "$OUT/results.tgz" -C "$R" .
cp "$R"/table/table.png "$OUT"/smollm2_table.png 2>/dev/null
find "$R"/outliers -name "*.png" | head -2 | while read f; do cp "$f" "$OUT"/; done
ls -la "$OUT"
