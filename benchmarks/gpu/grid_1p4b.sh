#!/usr/bin/env bash
# GPU: the 5-row PPL grid for the random OSP-1.4B-shaped model (results resume in /tmp/res14 across commands on a
# warm machine). Usage: grid_1p4b.sh METHODS [TIMEOUT_S]. Carry: .gpu/whl, .gpu/data, .gpu/p2.
set -uo pipefail
source benchmarks/gpu/_setup.sh
[ -f /tmp/osp14b/config.json ] || python3 benchmarks/gpu/make_random_1p4b.py /tmp/osp14b $M 2>&1 | tail -1
R=/tmp/res14; mkdir -p $R
echo "== table $1"; t0=$SECONDS
timeout ${2:-560} python3 -m osp_eval table /tmp/osp14b --bits 4-4-4 --methods $1 --calib_data c4 --output_dir $R --no_progress 2>&1 | grep -v Warn | tail -25
echo "   ($((SECONDS-t0)) s)"
tar czf $OUT/grid_1p4b.tgz -C $R .
