# Sourced by scripts/1…5: the interpreter ($PY: .venv's, or $OSP_EVAL_PYTHON, or python3) and the data folder
# ($OSP_EVAL_DATA, defaulting to ../shared/data when it exists). Layer streaming for models larger than the GPU:
# pass --offload auto|on|off, or set OSP_EVAL_OFFLOAD (read by osp-eval ppl/kurtosis/table; default auto).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${OSP_EVAL_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OSP_EVAL_DATA="${OSP_EVAL_DATA:-$( [ -d "$ROOT/../shared/data" ] && echo "$ROOT/../shared/data" )}"
[ -n "$OSP_EVAL_DATA" ] || unset OSP_EVAL_DATA
