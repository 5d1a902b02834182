"""What runs inside a quantized model at inference time: input transforms on Linears (online Hadamard,
dynamic activation fake-quant), V fake-quant on the v_proj output, and the attention function that
rotates Q/K and fake-quantizes K after RoPE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .quant import fake_quant_act


@dataclass
class ActSpec:
    bits: int = 16
    sym: bool = False
    clip_ratio: float = 1.0
    groupsize: int = -1
    zero_in_range: bool | None = None
    ste: bool = False  # straight-through gradients (rotation training)
    kernels: str = "reference"  # "reference" | "triton" | "auto" (osp_eval.kernels; same values)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels != "reference" and self.bits < 16:
            from .kernels import fake_quant_act as dispatch

            return dispatch(x, self.bits, self.sym, self.clip_ratio, self.groupsize, self.zero_in_range, self.ste,
                            self.kernels)
        return fake_quant_act(x, self.bits, self.sym, self.clip_ratio, self.groupsize, self.zero_in_range, self.ste)


class InputTransform(nn.Module):
    """Applied to a Linear's input by a forward pre-hook: optional online rotation, then fake quant.

    `quant_enabled` lets GPTQ collect statistics with the rotation active but activations unquantized.
    Holds no persistent state, so the model's state_dict is unchanged.
    """

    def __init__(self, act: ActSpec, rotation=None):
        super().__init__()
        self.act = act
        self.rotation = rotation  # callable on the last dim, or None
        self.quant_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        if self.quant_enabled:
            x = self.act(x)
        return x

    def extra_repr(self) -> str:
        return f"act={self.act}, rotation={self.rotation}"


class SharedInput:
    """The Linears that read one tensor (q/k/v, gate/up) share its transformed copy: the first one computes it,
    the others take it (the same function of the same tensor, so the same values), the last one lets go of it.
    Skipped while autograd records (rotation training: one quantizer node instead of three would sum the
    gradients in another order) and whenever the tensor, its version or the transform differ."""

    def __init__(self, n: int):
        self.n, self.left, self.key, self.y = n, 0, None, None

    def __call__(self, transform: InputTransform, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile a tensor's version is a data-dependent symbol (a graph break); inside one traced
        # graph nothing writes x in place between the Linears that read it
        version = None if torch.compiler.is_compiling() else x._version
        key = (x, version, transform.act, transform.rotation, transform.quant_enabled)
        if self.left and self.key[0] is x and self.key[1:] == key[1:]:
            y, self.left = self.y, self.left - 1
            if not self.left:
                self.key = self.y = None
            return y
        y = transform(x)
        if torch.is_grad_enabled() and x.requires_grad:
            self.left, self.key, self.y = 0, None, None
        else:
            self.left, self.key, self.y = self.n - 1, key, y
        return y


def _input_pre_hook(module: nn.Module, args):
    shared = getattr(module, "osp_shared", None)
    y = module.osp_input(args[0]) if shared is None else shared(module.osp_input, args[0])
    return (y,) + tuple(args[1:])


def share_inputs(linears: list[nn.Linear]) -> None:
    """Let Linears fed the same tensor, each with an equal InputTransform, quantize it once per call."""
    shared = SharedInput(len(linears)) if len(linears) > 1 else None
    for lin in linears:
        if shared is None:
            lin.__dict__.pop("osp_shared", None)
        else:
            lin.osp_shared = shared


def install_input_transform(linear: nn.Linear, act: ActSpec, rotation=None) -> InputTransform:
    remove_input_transform(linear)
    linear.osp_input = InputTransform(act, rotation)
    linear.osp_input_hook = linear.register_forward_pre_hook(_input_pre_hook)
    return linear.osp_input


def remove_input_transform(linear: nn.Linear) -> None:
    if hasattr(linear, "osp_input_hook"):
        linear.osp_input_hook.remove()
        del linear.osp_input_hook
        del linear.osp_input
        linear.__dict__.pop("osp_shared", None)


class OutputQuant(nn.Module):
    """Fake-quantizes a Linear's output (the V cache: v_proj output, per token and head)."""

    def __init__(self, act: ActSpec):
        super().__init__()
        self.act = act

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.act(y)


def _output_hook(module: nn.Module, args, out):
    return module.osp_output(out)


def install_output_quant(linear: nn.Linear, act: ActSpec) -> None:
    if hasattr(linear, "osp_output_hook"):
        linear.osp_output_hook.remove()
    linear.osp_output = OutputQuant(act)
    linear.osp_output_hook = linear.register_forward_hook(_output_hook)


@dataclass
class KSpec:
    """Q/K rotation after RoPE (R3, always on when K is quantized) and K fake quant per token and head."""

    act: ActSpec
    rotate: bool = True

    def __call__(self, query: torch.Tensor, key: torch.Tensor):
        if self.rotate and self.act.kernels != "reference":
            from .kernels import qk_hadamard

            # One Triton pass per tensor where it serves (same values); otherwise the code below.
            return qk_hadamard(query, key, self.act, self.act.kernels)
        if self.rotate:
            from .hadamard import hadamard_transform

            # The reference computes this Hadamard in fp32 (for half-precision inputs) and casts back.
            query = hadamard_transform(query, fp32=True)
            key = hadamard_transform(key, fp32=True)
        return query, self.act(key)


ATTN_IMPL = "osp_sdpa"
# The K path wraps the family's own attention kernel: SDPA, or the modeling file's eager function where a family
# needs it (Gemma 2's logit soft-capping, which SDPA does not implement).
ATTN_IMPLS = {"sdpa": "osp_sdpa", "eager": "osp_eager"}


def _base_attention(module, name: str):
    if name == "eager":
        import sys

        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _osp_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        """The family's attention after the K path: keys arrive post-RoPE and post-cache, shape
        [batch, kv_heads, tokens, head_dim]. The cache holds unrotated, unquantized keys; rotation and rounding
        are deterministic per token, so re-applying them at every decoding step gives what a quantized cache
        would hold."""
        kspec = getattr(module, "osp_k", None)
        if kspec is not None:
            query, key = kspec(query, key)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    return attention


osp_sdpa_attention = _osp_attention("sdpa")


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    for base, name in ATTN_IMPLS.items():
        AttentionInterface.register(name, _osp_attention(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask if base == "eager" else sdpa_mask)
