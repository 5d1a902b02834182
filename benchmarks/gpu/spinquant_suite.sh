#!/usr/bin/env bash
# GPU command 2 (after `stage.sh .gpu/p1`): SpinQuant step timings, the full 5-row SmolLM2-135M table (C4 calibration),
# and the random OSP-1.4B-shaped model saved to /tmp/osp14b for grid_1p4b.sh.
# Carry: .gpu/whl, .gpu/data, .gpu/p2.
set -uo pipefail
source benchmarks/gpu/_setup.sh
R=/tmp/res; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== bench_spinquant SmolLM2"; python3 benchmarks/bench_spinquant.py --model $M --micro_batch_sizes 8,1 --steps 2 2>&1 | grep -v Warn | tail -3
echo "== table"; t0=$SECONDS
python3 -m osp_eval table $M --bits 4-4-4 --methods rtn,ffn_had,gptq,quarot,spinquant --calib_data c4 --output_dir $R --no_progress 2>&1 | grep -v Warn | tail -25
echo "   ($((SECONDS-t0)) s)"
[ -f /tmp/osp14b/config.json ] || python3 benchmarks/gpu/make_random_1p4b.py /tmp/osp14b $M 2>&1 | tail -1
cp benchmarks/results/bench_spinquant_*.json $R/ 2>/dev/null
tar czf $OUT/smollm2_spinquant.tgz -C $R .
cp $R/table/table.png $OUT/smollm2_table.png 2>/dev/null; ls -la $OUT
