"""Offline rotations folded into weights, and the online transforms that complete them.

`--rotate_down_proj` (R4 only): the down_proj weight gets the exact inverse of an online Hadamard on its input.
`--rotate` (QuaRot / SpinQuant), in this order, offline math in float64 then cast back:
  1. untie lm_head from the embedding; optionally mean-centre the embedding rows (reference parity; NOT
     function-preserving for RMSNorm models, so the 16-bit invariance holds only with it off);
  2. fold every pre-norm's gain into the Linears that read it (q/k/v, gate/up, lm_head) and set it to 1;
  3. R1 (hidden×hidden, orthogonal): residual stream x -> x·R1: readers get W·R1, writers R1ᵀ·W; a norm on a
     block's output (Gemma, OLMo 2) keeps a unit gain and is followed online by R1ᵀ·diag(gain)·R1;
  4. R2 (head_dim×head_dim, per layer): v_proj output rows and o_proj input columns, per head;
  5. R4: the down_proj Hadamard (online on its input, inverse folded into the weight).
R3 (Q/K Hadamard after RoPE) lives in the attention function: it is on whenever K is quantized.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .arch import Dims, base_role, get_adapter
from .config import QuantConfig
from .errors import OspEvalError
from .hadamard import hadamard_matrix, hadamard_transform, random_hadamard_matrix


class OnlineHadamard:
    """x -> normalised Hadamard over the last dim (in x's dtype unless fp32)."""

    def __init__(self, fp32: bool = False):
        self.fp32 = fp32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, fp32=self.fp32)

    def __repr__(self) -> str:
        return f"OnlineHadamard(fp32={self.fp32})"


class CrossHeadHadamard:
    """QuaRot's o_proj input transform: a Hadamard across heads ([.., heads, head_dim] -> over heads).

    With the per-head Hadamard folded into v_proj, the two make the full Hadamard of size heads·head_dim
    that is folded into the o_proj weight.
    """

    def __init__(self, num_heads: int, fp32: bool = False):
        self.num_heads, self.fp32 = num_heads, fp32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = x.reshape(*shape[:-1], self.num_heads, -1).transpose(-1, -2)
        return hadamard_transform(y, fp32=self.fp32).transpose(-1, -2).reshape(shape)

    def __repr__(self) -> str:
        return f"CrossHeadHadamard(heads={self.num_heads}, fp32={self.fp32})"


def _set(linear_or_emb: nn.Module, w: torch.Tensor) -> None:
    p = linear_or_emb.weight
    p.data = w.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def fold_input_hadamard(linear: nn.Linear) -> None:
    """W <- W·Hᵀ/√n (rows transformed) so that W'·(H x/√n) = W x; computed in float64."""
    _set(linear, hadamard_transform(linear.weight.data.double()))


@torch.no_grad()
def untie_lm_head(model: nn.Module) -> None:
    ad = get_adapter(model)
    head, emb = ad.lm_head(model), ad.embed(model)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []


def norm_gain(norm: nn.Module, offset: float) -> torch.Tensor:
    """The RMSNorm's multiplier in float64: γ, or 1 + γ for Gemma's norms (offset 1)."""
    return norm.weight.data.double() + offset


def set_unit_gain(norm: nn.Module, offset: float) -> None:
    norm.weight.data.fill_(1.0 - offset)


def _fold(norm: nn.Module | None, readers: list[nn.Linear], offset: float) -> None:
    if norm is None:
        return
    g = norm_gain(norm, offset)
    for lin in readers:
        _set(lin, lin.weight.data.double() * g)
    set_unit_gain(norm, offset)


@torch.no_grad()
def fuse_layer_norms(layer: nn.Module, ad) -> None:
    """One decoder layer's part of `fuse_norms`."""
    lin = ad.linears(layer)
    attn_norm, mlp_norm = ad.norms(layer)
    _fold(attn_norm, [lin["q"], lin["k"], lin["v"]], ad.norm_offset)
    _fold(mlp_norm, [m for r, m in lin.items() if base_role(r) in ("gate", "up")] + ad.routers(layer), ad.norm_offset)


@torch.no_grad()
def fuse_norms(model: nn.Module, layers: bool = True) -> None:
    """Fold each pre-norm's gain into the input columns of the Linears that read its output; set the gain to 1.
    (Blocks that read the raw residual have nothing to fold; output norms are handled by `rotate_out_norms`.)
    `layers=False`: only the final norm (a layer-streamed model's layers are done one by one)."""
    ad = get_adapter(model)
    for layer in ad.layers(model) if layers else ():
        fuse_layer_norms(layer, ad)
    _fold(ad.final_norm(model), [ad.lm_head(model)], ad.norm_offset)


class OutNormGain(nn.Module):
    """After a unit-gain RMSNorm on a block's output, in the R1 basis: y -> y·R1ᵀ·diag(g)·R1.

    RMSNorm without its gain commutes with an orthogonal R1 (rms(x·R1) = rms(x)); the gain g does not. The
    block's writer (o_proj/down_proj) writes x·R1, the unit-gain norm gives norm(x)·R1, and this matrix turns
    it into (norm(x)·diag(g))·R1 — what the residual stream expects. With `r1` a callable (SpinQuant training:
    the trainable R1), the product is formed from the current R1 on each call."""

    def __init__(self, gain: torch.Tensor, r1):
        super().__init__()
        self.register_buffer("gain", gain.detach().clone(), persistent=False)
        if callable(r1):
            self.r1_fn, self.matrix = r1, None
        else:
            self.r1_fn = None
            r1 = r1.double().to(gain.device)
            self.register_buffer("matrix", (r1.T * gain.double()) @ r1, persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            dt = torch.promote_types(y.dtype, torch.float32)  # fp32 for half models, fp64 for fp64 ones
            if self.matrix.dtype != dt:
                self.matrix = self.matrix.to(dt)
            return (y.to(dt) @ self.matrix).to(y.dtype)
        r1 = self.r1_fn()
        return (((y.to(r1.dtype) @ r1.T) * self.gain.to(r1.dtype)) @ r1).to(y.dtype)


def _out_norm_hook(module: nn.Module, args, out):
    return module.osp_out_gain(out)


def rotate_layer_out_norms(layer: nn.Module, ad, r1) -> None:
    """Give a layer's block-output norms a unit gain followed by their OutNormGain (families with post-norms)."""
    for norm in ad.out_norms(layer):
        if norm is None:
            continue
        gain = norm_gain(norm, ad.norm_offset)
        if hasattr(norm, "osp_out_gain_hook"):
            norm.osp_out_gain_hook.remove()
        norm.osp_out_gain = OutNormGain(gain, r1)
        norm.osp_out_gain_hook = norm.register_forward_hook(_out_norm_hook)
        set_unit_gain(norm, ad.norm_offset)


def rotate_out_norms(model: nn.Module, r1) -> None:
    ad = get_adapter(model)
    for layer in ad.layers(model):
        rotate_layer_out_norms(layer, ad, r1)


def draw_rotations(cfg: QuantConfig, dims: Dims, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """R1 and the per-layer R2s: from `optimized_rotation_path`, or random Hadamards drawn as the reference
    does (global torch RNG seeded with `rotation_seed`; R1 first, then each layer's R2 in order).
    In the QuaRot-paper mode (o_proj_input='hadamard') R2 is the plain per-head Hadamard."""
    if cfg.optimized_rotation_path:
        return load_rotations(cfg.optimized_rotation_path, dims)
    torch.manual_seed(cfg.rotation_seed)
    r1 = random_hadamard_matrix(dims.hidden)
    if cfg.o_proj_input == "hadamard":
        h = hadamard_matrix(dims.head_dim).T / math.sqrt(dims.head_dim)
        return r1, [h] * dims.num_layers
    return r1, [random_hadamard_matrix(dims.head_dim) for _ in range(dims.num_layers)]


def _check_rotation(path: str, key: str, r, n: int, tol: float = 1e-3) -> torch.Tensor:
    """A rotation must be an n x n finite orthogonal matrix: max |R Rᵀ - I| <= tol in float64."""
    if not isinstance(r, torch.Tensor) or tuple(r.shape) != (n, n):
        shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise OspEvalError(f"{path}: {key} has shape {shape}, this model needs ({n}, {n})")
    r = r.double()
    if not torch.isfinite(r).all():
        raise OspEvalError(f"{path}: {key} has {int((~torch.isfinite(r)).sum())} non-finite entries (NaN/inf)")
    err = (r @ r.T - torch.eye(n, dtype=r.dtype)).abs().max().item()
    if err > tol:
        raise OspEvalError(f"{path}: {key} is not orthogonal (max |R Rᵀ - I| = {err:.3g} > {tol:g}); a rotation file "
                           "must hold orthogonal matrices")
    return r


def load_rotations(path: str, dims: Dims) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A SpinQuant `R.bin`: {"R1": [hidden, hidden], "model.layers.{i}.self_attn.R2": [head_dim, head_dim]},
    validated: keys, shapes, finite, orthogonal to 1e-3 in float64."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise OspEvalError(f"rotation file not found: {path}") from e
    except Exception as e:  # torch's unpickling errors run to several lines: keep the first
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OspEvalError(f"cannot read rotation file {path} ({first})") from e
    if not isinstance(d, dict) or "R1" not in d:
        raise OspEvalError(f"{path} is not a SpinQuant rotation file (no 'R1' key)")
    r1 = _check_rotation(path, "R1", d["R1"], dims.hidden)
    r2s = []
    for i in range(dims.num_layers):
        key = f"model.layers.{i}.self_attn.R2"
        if key not in d:
            raise OspEvalError(f"{path}: missing {key} (the model has {dims.num_layers} layers)")
        r2s.append(_check_rotation(path, key, d[key], dims.head_dim))
    return r1, r2s


# Pure, differentiable pieces of R1/R2 (SpinQuant training runs them on every step; apply_r1_r2 once).
def rotate_reader(w: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """Input side of the residual stream (embedding rows, q/k/v, gate/up, lm_head): W·R1."""
    return w @ r1


def rotate_writer(w: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """Output side (o_proj, down_proj weight [out, in] or bias [out]): R1ᵀ·W."""
    return r1.T @ w


def rotate_v_rows(w: torch.Tensor, r2: torch.Tensor, head_dim: int) -> torch.Tensor:
    """v_proj weight [heads·head_dim, in]: each head's rows -> R2ᵀ·W_h."""
    return torch.einsum("dk,hdi->hki", r2, w.view(-1, head_dim, w.shape[-1])).reshape(-1, w.shape[-1])


def rotate_v_bias(b: torch.Tensor, r2: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (b.view(-1, head_dim) @ r2).reshape(-1)


def rotate_o_cols(w: torch.Tensor, r2: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj weight [out, heads·head_dim]: each head's columns -> W_h·R2."""
    return (w.view(w.shape[0], -1, head_dim) @ r2).reshape(w.shape[0], -1)


def _reads(m: nn.Module, r1: torch.Tensor) -> None:
    _set(m, rotate_reader(m.weight.data.double(), r1))


def _writes(lin: nn.Linear, r1: torch.Tensor) -> None:  # the weight and the bias
    _set(lin, rotate_writer(lin.weight.data.double(), r1))
    if lin.bias is not None:
        lin.bias.data = rotate_writer(lin.bias.data.double(), r1).to(lin.bias)


@torch.no_grad()
def rotate_layer(layer: nn.Module, ad, r1: torch.Tensor, r2: torch.Tensor, head_dim: int,
                 o_full_hadamard: bool = False) -> None:
    """R1 and R2 on one decoder layer's Linears (r1, r2 float64 on the layer's device)."""
    lin = ad.linears(layer)
    for role, m in lin.items():
        if base_role(role) in ("q", "k", "v", "gate", "up"):
            _reads(m, r1)
        elif base_role(role) in ("o", "down"):
            _writes(m, r1)
    for router in ad.routers(layer):  # full precision, but it reads the rotated residual: routing is kept
        _reads(router, r1)
    v = lin["v"]
    _set(v, rotate_v_rows(v.weight.data.double(), r2, head_dim))
    if v.bias is not None:
        v.bias.data = rotate_v_bias(v.bias.data.double(), r2, head_dim).to(v.bias)
    # o_proj input columns per head (or the full Hadamard, QuaRot paper)
    o = lin["o"]
    if o_full_hadamard:
        fold_input_hadamard(o)
    else:
        _set(o, rotate_o_cols(o.weight.data.double(), r2, head_dim))


@torch.no_grad()
def apply_r1_r2(model: nn.Module, r1: torch.Tensor, r2s: list[torch.Tensor], o_full_hadamard: bool = False,
                layers: bool = True) -> None:
    """R1 on the embedding and lm_head, then R1/R2 on every layer (`layers=False`: the model-level part only)."""
    ad = get_adapter(model)
    hd = ad.dims(model).head_dim
    device = ad.embed(model).weight.device  # float64 on the model's device: GPUs do this in seconds
    r1 = r1.double().to(device)
    _reads(ad.embed(model), r1)
    _reads(ad.lm_head(model), r1)
    for layer, r2 in zip(ad.layers(model) if layers else (), r2s):
        rotate_layer(layer, ad, r1, r2.double().to(device), hd, o_full_hadamard)


@torch.no_grad()
def prepare_for_r1(model: nn.Module, cfg: QuantConfig, layers: bool = True) -> None:
    """Steps 1-2 of --rotate (untie, optional embedding centring, norm fusion): what R1/R2 are applied to."""
    untie_lm_head(model)
    if cfg.center_embeddings:
        w = get_adapter(model).embed(model).weight.data
        w.sub_(w.double().mean(-1, keepdim=True).to(w.dtype))
    fuse_norms(model, layers)


@torch.no_grad()
def rotate_model(model: nn.Module, cfg: QuantConfig) -> dict[str, object]:
    """Apply the offline part of the configured rotation; return the online transforms by Linear role.

    Model-level weights first (embedding, final norm, lm_head), then each layer, on the model's compute device
    in float64 (a layer-streamed model's layers visit the device one at a time: the same arithmetic)."""
    from .offload import compute_device, walk

    ad = get_adapter(model)
    dims = ad.dims(model)
    device = compute_device(model)
    o_full = cfg.o_proj_input == "hadamard"
    online: dict[str, object] = {"down": OnlineHadamard(cfg.fp32_had)}
    if cfg.rotate:
        prepare_for_r1(model, cfg, layers=False)
        r1, r2s = draw_rotations(cfg, dims, device)
        apply_r1_r2(model, r1, r2s, o_full, layers=False)
        r1 = r1.double().to(device)
        if o_full:
            online["o"] = CrossHeadHadamard(dims.num_heads, cfg.fp32_had)

    def one(i, layer):
        if cfg.rotate:
            fuse_layer_norms(layer, ad)
            rotate_layer(layer, ad, r1, r2s[i].double().to(device), dims.head_dim, o_full)
            rotate_layer_out_norms(layer, ad, r1)
        for role, m in ad.linears(layer).items():
            if base_role(role) == "down":
                fold_input_hadamard(m)

    for _ in walk(ad.layers(model), device, one, write_back=True):
        pass
    return online
