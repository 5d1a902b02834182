#!/usr/bin/env bash
# Usage: bash scripts/5_eval_ppl_spinquant.sh MODEL W_BITS A_BITS KV_BITS [ROTATION_FILE] [extra flags]
# SpinQuant: learned R1/R2 (`--rotate --optimized_rotation_path R.bin`), GPTQ weights unless --w_rtn.
# Without ROTATION_FILE, first trains one (`osp-eval spinquant-train`: Cayley SGD, 100 steps of 8 windows of
# 2048 tokens, lr 1.5, cosine; W16 while training when GPTQ follows) into
# $OSP_EVAL_ROTATION_DIR (default results/rotations)/MODEL_wWaAkvKV/R.bin, then evaluates with it.
# Extra flags go to both commands, except training-only flags (--steps, --lr, --momentum, --train_*,
# --micro_batch_size, --[no-]gradient_checkpointing; --save_path PATH moves the trained file) and PPL-only flags (--seqlen,
# --batch_size, --max_windows, --offload: rotation training needs the whole model on the GPU). Offline (no WikiText-2 train split) pass --calib_data c4.
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: bash $0 MODEL W_BITS A_BITS KV_BITS [ROTATION_FILE] [flags]" >&2; exit 2; fi
source "$(dirname "$0")/_env.sh"
MODEL=$1 W=$2 A=$3 KV=$4; shift 4
ROT=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then ROT=$1; shift; fi

# Split the extra flags: TRAIN gets all but the PPL-only ones, PPL all but the training-only ones.
TRAIN=() PPL=() SAVE=""
while [ $# -gt 0 ]; do
  flag=$1; shift
  case "$flag" in
    --gradient_checkpointing|--no-gradient_checkpointing) TRAIN+=("$flag"); continue ;;
  esac
  name=${flag%%=*} value=()
  if [ "$name" = "$flag" ] && [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then value=("$1"); shift; fi
  case "$name" in
    --save_path) SAVE=${value[0]:-${flag#*=}} ;;
    --steps|--lr|--momentum|--train_nsamples|--train_seqlen|--train_batch_size|--micro_batch_size)
      TRAIN+=("$flag" "${value[@]}") ;;
    --seqlen|--batch_size|--max_windows|--offload) PPL+=("$flag" "${value[@]}") ;;
    *) TRAIN+=("$flag" "${value[@]}"); PPL+=("$flag" "${value[@]}") ;;
  esac
done

if [ -z "$ROT" ]; then
  SLUG=$(basename "${MODEL%/}"); SLUG=${SLUG%.gguf}
  ROT=${SAVE:-"${OSP_EVAL_ROTATION_DIR:-results/rotations}/${SLUG}_w${W}a${A}kv${KV}/R.bin"}
  "$PY" -m osp_eval spinquant-train "$MODEL" --w_bits "$W" --a_bits "$A" --kv_bits "$KV" --save_path "$ROT" \
    ${TRAIN[@]+"${TRAIN[@]}"}
fi
[ -f "$ROT" ] || { echo "rotation file not found: $ROT" >&2; exit 2; }
exec "$PY" -m osp_eval ppl "$MODEL" --w_bits "$W" --a_bits "$A" --kv_bits "$KV" --rotate \
  --optimized_rotation_path "$ROT" ${PPL[@]+"${PPL[@]}"}
