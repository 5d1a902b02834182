"""A quantization recipe is data: one dataclass, named presets, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import OspEvalError

VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
KERNELS = ("reference", "triton", "auto", "fast")  # osp_eval.kernels
INEXACT_KERNELS = ("triton", "fast")  # may round differently from the reference: part of the cache identity


@dataclass
class QuantConfig:
    """Everything that decides what a quantized model computes.

    Bits of 16 mean "off". Group sizes of -1 mean one group per row (weights: per output channel;
    activations: per token). Names follow the reference's flags (SpinQuant/OSP `ptq.py`).
    """

    preset: str = "osp"
    # weights
    w_bits: int = 16
    w_groupsize: int = -1
    w_asym: bool = False
    w_clip: bool = True  # MSE clip search (80 shrink factors, |err|^2.4)
    w_method: str = "rtn"  # "rtn" | "gptq"
    # GPTQ
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    nsamples: int = 128
    calib_data: str = "wikitext2"  # "wikitext2" | "c4" | a local file path
    calib_seqlen: int = 2048
    seed: int = 0
    # activations (input of every decoder-layer Linear)
    a_bits: int = 16
    a_groupsize: int = -1
    a_asym: bool = True
    a_clip_ratio: float = 1.0
    # KV cache
    k_bits: int = 16
    k_groupsize: int = -1  # -1 or head_dim: per token per head either way (as the reference)
    k_asym: bool = True
    k_clip_ratio: float = 1.0
    v_bits: int = 16
    v_asym: bool = True
    v_clip_ratio: float = 1.0
    # o_proj input: "per_head" (OSP/SpinQuant: groups of head_dim) or
    # "hadamard" (QuaRot paper: online cross-head Hadamard, then full-width per token)
    o_proj_input: str = "per_head"
    # rotations
    rotate: bool = False  # full QuaRot: norm fusion, R1, R2, R3, R4
    rotate_down_proj: bool = False  # R4 only (online Hadamard on the down_proj input)
    fp32_had: bool = False
    center_embeddings: bool = True
    optimized_rotation_path: str | None = None
    rotation_seed: int = 0
    extra: dict = field(default_factory=dict)
    # How the quantizers and GPTQ/SpinQuant arithmetic run (osp_eval.kernels): "reference" (PyTorch ops), "auto"
    # (the Triton kernels that reproduced the reference bit for bit on this GPU: the same numbers), "fast" (auto
    # plus GPU arithmetic equal to the reference's only in exact arithmetic: other roundings, other GPTQ codes),
    # "triton" (every kernel and fast path forced, unchecked). reference/auto are a label; triton/fast are identity.
    kernels: str = "auto"

    def replace(self, **kw) -> "QuantConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The fields that change what this recipe computes (the cache identity of its results): a group's
        fields only when the group is active, so an RTN cell is not recomputed when a GPTQ-only flag changes.
        The preset name and the kernels reference/auto (the same numbers) are labels, triton/fast (other
        roundings) are identity; a learned rotation file enters identities by its sha256, not its path."""
        d = self.to_dict()
        drop = {"preset", "optimized_rotation_path"} | ({"kernels"} if self.kernels not in INEXACT_KERNELS else set())
        if not d["extra"]:
            drop.add("extra")
        if self.w_bits == 16:
            drop |= {"w_groupsize", "w_asym", "w_clip", "w_method"}
        if self.w_bits == 16 or self.w_method != "gptq":
            drop |= {"percdamp", "act_order", "static_groups", "nsamples", "calib_data", "calib_seqlen", "seed"}
        if self.a_bits == 16:
            drop |= {"a_groupsize", "a_asym", "a_clip_ratio"}
        if self.k_bits == 16:
            drop |= {"k_groupsize", "k_asym", "k_clip_ratio"}
        if self.v_bits == 16:
            drop |= {"v_asym", "v_clip_ratio"}
        if not self.rotate:
            drop |= {"center_embeddings", "rotation_seed"}
        if not (self.rotate or self.rotate_down_proj):
            drop.add("fp32_had")
        return {k: v for k, v in d.items() if k not in drop}

    def set_kv_bits(self, bits: int) -> "QuantConfig":
        return self.replace(k_bits=bits, v_bits=bits)

    def validate(self) -> "QuantConfig":
        for name in ("w_bits", "a_bits", "k_bits", "v_bits"):
            b = getattr(self, name)
            if b not in VALID_BITS:
                raise OspEvalError(f"--{name} {b} is not supported: choose one of 2..8, or 16 for no quantization")
        if self.kernels not in KERNELS:
            raise OspEvalError(f"--kernels {self.kernels!r}: choose one of {', '.join(KERNELS)}")
        if self.w_method not in ("rtn", "gptq"):
            raise OspEvalError(f"unknown weight method {self.w_method!r}: use 'rtn' or 'gptq'")
        if self.rotate and self.rotate_down_proj:
            raise OspEvalError(
                "--rotate already includes the down_proj Hadamard: pass --rotate or --rotate_down_proj, not both"
            )
        if self.optimized_rotation_path and not self.rotate:
            raise OspEvalError("--optimized_rotation_path needs --rotate (learned R1/R2 replace the random ones)")
        if self.o_proj_input not in ("per_head", "hadamard"):
            raise OspEvalError(f"unknown o_proj_input {self.o_proj_input!r}: use 'per_head' or 'hadamard'")
        for name in ("a_clip_ratio", "k_clip_ratio", "v_clip_ratio"):
            c = getattr(self, name)
            if not 0 < c <= 1:
                raise OspEvalError(f"--{name} {c} must be in (0, 1]")
        for name in ("w_groupsize", "a_groupsize", "k_groupsize"):
            g = getattr(self, name)
            if g != -1 and g <= 0:
                raise OspEvalError(f"--{name} {g} must be -1 (off) or a positive group size")
        if not 0 <= self.percdamp < 1:
            raise OspEvalError(f"--percdamp {self.percdamp} must be in [0, 1)")
        if self.nsamples <= 0:
            raise OspEvalError(f"--nsamples {self.nsamples} must be positive")
        if self.calib_seqlen < 2:
            raise OspEvalError(f"--calib_seqlen {self.calib_seqlen} must be at least 2")
        return self

    @property
    def is_noop(self) -> bool:
        return (
            max(self.w_bits, self.a_bits, self.k_bits, self.v_bits) == 16
            and min(self.w_bits, self.a_bits, self.k_bits, self.v_bits) == 16
            and not self.rotate
            and not self.rotate_down_proj
        )


# The OSP scripts: `ptq.py ... --w_clip --a_asym --k_asym --v_asym --k_groupsize 128 --v_groupsize 128`, bf16.
OSP = QuantConfig(preset="osp")

# The QuaRot paper protocol: symmetric per-token activations clipped at 0.9, KV clipped at 0.95,
# online cross-head Hadamard on the o_proj input (full-width per token), GPTQ weights.
QUAROT_PAPER = QuantConfig(
    preset="quarot_paper",
    a_asym=False,
    a_clip_ratio=0.9,
    k_clip_ratio=0.95,
    v_clip_ratio=0.95,
    o_proj_input="hadamard",
    w_method="gptq",
)

PRESETS: dict[str, QuantConfig] = {"osp": OSP, "quarot_paper": QUAROT_PAPER}


def preset(name: str, **overrides) -> QuantConfig:
    if name not in PRESETS:
        raise OspEvalError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides).validate()
