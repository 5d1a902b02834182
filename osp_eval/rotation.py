"""Offline rotations folded into weights, and the online transforms that complete them.

`--rotate_down_proj` (R4): the down_proj weight gets the exact inverse of an online Hadamard on its input.
`--rotate` (QuaRot): R1/R2/R4 plus norm fusion (see `rotate_model`).
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import get_adapter
from .config import QuantConfig
from .errors import OspEvalError
from .hadamard import hadamard_transform


class OnlineHadamard:
    """x -> normalised Hadamard over the last dim (in x's dtype unless fp32)."""

    def __init__(self, fp32: bool = False):
        self.fp32 = fp32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, fp32=self.fp32)

    def __repr__(self) -> str:
        return f"OnlineHadamard(fp32={self.fp32})"


@torch.no_grad()
def fold_input_hadamard(linear: nn.Linear) -> None:
    """W <- W·Hᵀ/√n (rows transformed) so that W'·(H x/√n) = W x; computed in float64."""
    w = linear.weight.data
    linear.weight.data = hadamard_transform(w.double()).to(w.dtype)


def rotate_model(model: nn.Module, cfg: QuantConfig) -> dict[str, object]:
    """Apply the offline part of the configured rotation; return the online transforms by Linear role."""
    ad = get_adapter(model)
    if cfg.rotate:
        raise OspEvalError("--rotate (full QuaRot) is not implemented yet: use --rotate_down_proj")
    for layer in ad.layers(model):
        fold_input_hadamard(ad.linears(layer)["down"])
    return {"down": OnlineHadamard(cfg.fp32_had)}
