#!/usr/bin/env bash
# Usage: bash scripts/3_eval_ppl_gptq_had.sh MODEL W_BITS A_BITS KV_BITS [extra osp-eval ppl flags]
# The OSP reference script's arguments: --w_clip --a_asym --k_asym --v_asym --k_groupsize 128 --v_groupsize 128
# are the defaults of the 'osp' preset; this script adds: --rotate_down_proj
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: bash $0 MODEL W_BITS A_BITS KV_BITS [flags]" >&2; exit 2; fi
source "$(dirname "$0")/_env.sh"
MODEL=$1 W=$2 A=$3 KV=$4; shift 4
exec "$PY" -m osp_eval ppl "$MODEL" --w_bits "$W" --a_bits "$A" --kv_bits "$KV" --rotate_down_proj "$@"
