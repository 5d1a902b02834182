"""PTX of an osp_eval.kernels Triton kernel compiled for sm_90 (Hopper) without a GPU, in a subprocess without
the interpreter: for checks such as "no fused multiply-add" and "IEEE division" that the CPU tests cannot see."""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import osp_eval.kernels as K
name, signature, variants, warps = json.loads(sys.argv[1])
ptx = []
for constexprs in variants:
    try:
        k = triton.compile(ASTSource(fn=getattr(K, name), signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "enable_fp_fusion": False})
    except Exception as e:
        print(json.dumps({"skip": type(e).__name__ + ": " + str(e)[:200]}))
        raise SystemExit
    ptx.append(k.asm["ptx"])
print(json.dumps({"ptx": ptx}))
"""


def sm90_ptx(kernel: str, signature: dict, variants: list[dict], num_warps: int = 4) -> list[str]:
    """One PTX text per constexpr variant; skips the test where this Triton cannot target sm_90."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    arg = json.dumps([kernel, signature, variants, num_warps])
    out = subprocess.run([sys.executable, "-c", _SCRIPT, arg], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"cannot compile for sm_90 here: {res['skip']}")
    return res["ptx"]
