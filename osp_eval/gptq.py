"""GPTQ weight quantization (Frantar et al. 2022), as run by the reference (SpinQuant/OSP `gptq_utils.py`).

`gptq_quantize_weight` is the per-Linear math (a pure function). `gptq_quantize_model` walks the decoder
layers with calibration data: it collects each Linear's Hessian H = 2/n Σ x xᵀ of the input the Linear
actually sees (after any online rotation), in the true-sequential order of the adapter, and replaces
the weights by their fake-quantized values. Scales come from `quant.weight_qparams`, so RTN and GPTQ
share one grid.

Differences from the reference (the first three change nothing beyond float rounding):
- Linears fed the same tensor (k/v/q, up/gate) share one Hessian and are quantized as one stacked
  weight (GPTQ treats rows independently).
- A group's calibration forward stops once the group's Linears have run.
- Layer-call arguments (mask, positions, position_embeddings) are kept per batch, not the last batch's.
- On CUDA with `--kernels triton|auto` (the GPU default) three steps trade bit-identity for speed, each equal in
  exact arithmetic: bf16 inputs' Hessians on TF32 tensor cores (exact products, fp32 sums), H⁻¹'s Cholesky factor
  from one Cholesky and a triangular inverse, and the lazy block update from a contiguous transposed factor.
  `--kernels reference` (the CPU default) is the reference arithmetic.
- Dynamic groups: blocks are aligned to whole groups so a group is fitted on fully updated weights. The
  reference fits a group that starts inside a 128-column block (groupsize < 128, e.g. 64) on weights
  lacking that block's earlier updates; multiples of 128 agree. act_order with dynamic groups is refused.
"""

from __future__ import annotations


import logging
import time
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import base_role, get_adapter
from .config import INEXACT_KERNELS, QuantConfig
from .errors import OspEvalError
from .offload import StopForward as _StopForward
from .offload import capture_inputs, compute_device, is_streamed, run_layer, walk
from .quant import fake_quant_weight, quantize_dequant, weight_qparams

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the per-Linear math


def _check_args(cols: int, groupsize: int, act_order: bool, static_groups: bool) -> None:
    if groupsize > 0 and cols % groupsize:
        raise ValueError(f"GPTQ weight groupsize {groupsize} does not divide in_features {cols}")
    if groupsize > 0 and act_order and not static_groups:
        # Dynamic groups would be fitted over permuted (non-contiguous) columns: not a group layout.
        raise ValueError("GPTQ act_order with weight groups needs static_groups=True (groups are then fitted "
                         "on the original contiguous columns before the columns are reordered)")


def _block_kernel(kernels: str, W: torch.Tensor, fma: bool | None) -> bool | None:
    """The fma flag of the Triton block loop to use for W, or None for the reference loop."""
    if kernels == "reference":
        return None
    from . import kernels as K

    K.check_kernels(kernels)
    if kernels == "auto":
        return K.gptq_variant(W.device) if W.is_cuda and K.triton_available() else None
    K.use_triton(kernels, W)  # "triton" without CUDA (or the interpreter) is a one-line error there
    if fma is not None:
        return fma
    v = K.gptq_variant(W.device) if W.is_cuda else False
    return False if v is None else v


def _inverse_cholesky_upper(H: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU).

    Reference: cholesky, cholesky_inverse, cholesky upper (three O(n³) steps). `fast`: one Cholesky and one
    triangular inverse, equal in exact arithmetic: with J the order-reversing permutation, chol(J H J) = L gives
    H = Ũ Ũᵀ with Ũ = J L J upper triangular, so H⁻¹ = Ũ⁻ᵀ Ũ⁻¹ and U = Ũ⁻¹ (upper, positive diagonal)."""
    if fast:
        L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
        if info.item() == 0:
            eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            return torch.linalg.solve_triangular(L.flip(0, 1), eye, upper=True)
    else:
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise OspEvalError("GPTQ: the damped Hessian is not positive definite: raise --percdamp or use more "
                           "calibration samples")
    return U


@torch.no_grad()
def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    groupsize: int = -1,
    sym: bool = True,
    clip_search: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    kernels: str = "reference",
    fma: bool | None = None,
    fast_linalg: bool | None = None,
) -> torch.Tensor:
    """GPTQ-quantize W [out, in] given its input Hessian H [in, in]; returns the fake-quantized weight (W's dtype).

    Per-row scales (groupsize -1) are fitted once on the original weight, never refit. Dynamic groups
    are fitted when the loop reaches their first column, on the weights updated so far; static groups
    are all fitted on the original weight first. Rows are independent, so Linears that share an input
    can be stacked along rows and quantized in one call.

    `kernels` "triton"/"auto" run each block's column loop (per-row scales) as one Triton launch instead of
    ~10 launches per column, with the same arithmetic (`fma`: how the update rounds; auto uses the kernel only
    where it reproduced this loop bit for bit, see kernels.gptq_variant), and the clip search of every scale
    fit as one Triton launch (quant.weight_qparams; "fast"/"triton" only). On CUDA "fast"/"triton" also take
    H⁻¹'s factor from one Cholesky (`_inverse_cholesky_upper(fast=True)`): equal in exact arithmetic, not bit
    for bit, so other 4-bit codes.
    """
    if bits >= 16:
        return W
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"GPTQ: Hessian of shape {tuple(H.shape)} does not match in_features {cols}")
    _check_args(cols, groupsize, act_order, static_groups)
    W0 = W.detach().to(torch.float32, copy=True)
    H = H.detach().to(W.device, torch.float32, copy=True)

    if groupsize <= 0:  # the reference fits these before zeroing dead columns
        scale, zero = weight_qparams(W0, bits, sym, clip_search, kernels)
    dead = H.diagonal() == 0  # inputs that are always 0: any value works, take 0
    H.diagonal()[dead] = 1
    W0[:, dead] = 0
    if groupsize > 0 and static_groups:
        ngroups = cols // groupsize
        gscale, gzero = weight_qparams(W0.reshape(rows * ngroups, groupsize), bits, sym, clip_search, kernels)
        gscale, gzero = gscale.view(rows, ngroups).t().contiguous(), gzero.view(rows, ngroups).t().contiguous()

    perm = None
    if act_order:  # largest-Hessian columns first, while the most freedom is left to absorb their error
        perm = torch.argsort(H.diagonal(), descending=True)
        W0, H = W0[:, perm], H[perm][:, perm]
    H.diagonal().add_(percdamp * H.diagonal().mean())
    # fast_linalg (default: the GPU fast path) = the one-Cholesky inverse factor and the contiguous Vᵀ below.
    gpu_fast = kernels in INEXACT_KERNELS and W.is_cuda if fast_linalg is None else fast_linalg
    U = _inverse_cholesky_upper(H, fast=gpu_fast)
    del H
    # Row i of U divided by U_ii: propagating (w - q) along it is the reference's err = (w - q)/U_ii times U[i].
    V = U / U.diagonal()[:, None]
    del U
    # The lazy update multiplies by V[i1:i2, i2:]ᵀ; a transposed strided view sends cuBLAS to slow unaligned
    # SIMT kernels, a contiguous copy of Vᵀ (made once) does not.
    Vt = V.t().contiguous() if gpu_fast else None

    # Work transposed: one weight column is then one contiguous row, updated in place.
    Wt = W0.t().contiguous()
    del W0
    if groupsize > 0 and not static_groups:
        # Blocks hold whole groups, so a group is fitted on fully updated weights.
        blocksize = max(1, blocksize // groupsize) * groupsize
    if groupsize <= 0:
        s, z = scale[:, 0].contiguous(), zero[:, 0].contiguous()
    elif static_groups:
        group_of = [c // groupsize for c in (perm.tolist() if perm is not None else range(cols))]

    fast = _block_kernel(kernels, Wt, fma) if groupsize <= 0 else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, V1 = Wt[i1:i2], V[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)  # w - q per column (V carries the 1/U_ii)
        if fast is not None:
            from .kernels import gptq_block_triton

            gptq_block_triton(W1, V1, E1, s, z, bits, sym, fast)
        for i in range(0 if fast is None else i2 - i1, i2 - i1):
            if groupsize > 0:
                if static_groups:
                    g = group_of[i1 + i]
                    s, z = gscale[g], gzero[g]
                elif i % groupsize == 0:
                    gs, gz = weight_qparams(W1[i : i + groupsize].t(), bits, sym, clip_search, kernels)
                    s, z = gs[:, 0], gz[:, 0]
            w = W1[i]
            q = quantize_dequant(w, s, z, bits, sym)
            torch.sub(w, q, out=E1[i])
            W1[i + 1 :].addr_(V1[i, i + 1 :], E1[i], alpha=-1)
            w.copy_(q)  # W1 becomes the quantized block
        # Lazy batch update: the later columns receive this block's errors in one product.
        Wt[i2:].addmm_(V[i1:i2, i2:].t() if Vt is None else Vt[i2:, i1:i2], E1, alpha=-1)

    Q = Wt.t()
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(W.dtype).contiguous()


# --------------------------------------------------------------------------- Hessians of a layer's Linears


def _new_hessian(n: int, device) -> torch.Tensor:
    return torch.zeros(n, n, dtype=torch.float32, device=device)


class HessianHooks:
    """Forward hooks on a group of Linears that accumulate each input's Hessian in running-mean form.

    A forward hook receives the input after the Linear's pre-hooks (e.g. an online Hadamard), i.e. what
    the Linear really multiplies. Linears fed the very same tensor (k/v/q, up/gate) share one Hessian.
    Once every Linear of the group has run, the hook stops the layer's forward: the rest cannot change
    these inputs (each Linear runs once per forward in the Llama layout).
    """

    def __init__(self, linears: dict[str, nn.Linear], stop_early: bool = True, tf32: bool = False):
        self.linears = linears
        self.stop_early = stop_early
        self.tf32 = tf32  # bf16 inputs on CUDA: x xᵀ on TF32 tensor cores (see _accumulate)
        self.hessians: dict[str, torch.Tensor] = {}  # keyed by the first role that saw each input
        self.nsamples: dict[str, int] = {}
        self.key_of: dict[str, str] = {}  # role -> key of its Hessian
        self._seen: list[tuple[torch.Tensor, str]] = []  # this forward's inputs, for identity checks
        self._called: set[str] = set()
        self.handles = [lin.register_forward_hook(partial(self._hook, role)) for role, lin in linears.items()]

    def _hook(self, role: str, module: nn.Module, args, output) -> None:
        x = args[0]
        key = next((k for t, k in self._seen if t is x), None)
        if key is None:
            key = role
            self._seen.append((x, key))
            self._accumulate(key, x)
        if self.key_of.setdefault(role, key) != key:
            raise RuntimeError(f"GPTQ: the input of {role} is shared differently between calibration batches")
        self._called.add(role)
        if self.stop_early and len(self._called) == len(self.linears):
            raise _StopForward

    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        from .kernels import tf32_matmuls  # imports triton: only once GPTQ runs

        # Samples in the running mean: windows of a dense layer (all of one length), or tokens for an expert,
        # whose calls carry as many rows as tokens were routed to it.
        b = x.shape[0]
        # A bf16 value is exact in TF32 (8 of its 10 mantissa bits), so TF32 tensor cores form every product
        # x_i·x_j exactly and accumulate in fp32: the same sum as the fp32 SIMT GEMM up to summation order,
        # several times faster. Not for fp16/fp32 inputs, which TF32 would round.
        tf32 = self.tf32 and x.is_cuda and x.dtype == torch.bfloat16
        x = x.reshape(-1, x.shape[-1]).float()
        n = self.nsamples.get(key, 0)
        H = self.hessians.get(key)
        if H is None:
            H = self.hessians[key] = _new_hessian(x.shape[1], x.device)
        # H <- n/(n+b)·H + 2/(n+b)·Σ x xᵀ over the batch's tokens: the reference's running mean.
        with tf32_matmuls(tf32):
            H.addmm_(x.t(), x, beta=n / (n + b), alpha=2 / (n + b))
        self.nsamples[key] = n + b

    def start_forward(self) -> None:
        self._seen.clear()
        self._called.clear()

    def groups(self) -> dict[str, list[str]]:
        """Hessian key -> the roles that share it, in the group's order. A dense Linear must have been called;
        an expert that no calibration token was routed to has no Hessian and is left out (see uncalled)."""
        out: dict[str, list[str]] = {}
        for role in self.linears:
            if role not in self.key_of:
                if "." not in role:
                    raise OspEvalError(f"GPTQ: {role} was never called during calibration")
                continue
            out.setdefault(self.key_of[role], []).append(role)
        return out

    def uncalled(self) -> list[str]:
        return [r for r in self.linears if r not in self.key_of]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._seen.clear()


# --------------------------------------------------------------------------- the model walk


def _quantize_group(layer: nn.Module, index: int, linears: dict[str, nn.Linear], inps, calls,
                    cfg: QuantConfig) -> dict[str, dict]:
    """GPTQ one group of a layer's Linears. Returns per role: the relative weight change ||Q - W|| / ||W||, the
    calibration samples behind its Hessian (windows; tokens for an expert), and the method: "gptq", or RTN for
    an expert that no calibration token reached (without a Hessian GPTQ is undefined: the RTN recipe, clip search
    included, is the fallback)."""
    hooks = HessianHooks(linears, stop_early=not any("." in r for r in linears), tf32=cfg.kernels in INEXACT_KERNELS)
    try:
        run_layer(layer, index, inps, calls, hooks=hooks)
    finally:
        hooks.remove()
    report = {}
    for key, roles in hooks.groups().items():
        H = hooks.hessians.pop(key)
        weights = [linears[r].weight for r in roles]
        W = torch.cat(weights) if len(weights) > 1 else weights[0]
        Q = gptq_quantize_weight(W, H, cfg.w_bits, cfg.w_groupsize, not cfg.w_asym, cfg.w_clip, cfg.percdamp,
                                 act_order=cfg.act_order, static_groups=cfg.static_groups, kernels=cfg.kernels)
        del H
        if not torch.isfinite(Q).all():
            raise OspEvalError(f"GPTQ produced non-finite weights for {'/'.join(roles)}: raise --percdamp")
        for r, w, q in zip(roles, weights, Q.split([w.shape[0] for w in weights])):
            report[r] = {"method": "gptq", "samples": hooks.nsamples[key],
                         "rel_error": ((q.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()}
            w.data.copy_(q)
        del Q, W
    for r in hooks.uncalled():
        w = linears[r].weight
        q = fake_quant_weight(w.data, cfg.w_bits, cfg.w_groupsize, not cfg.w_asym, cfg.w_clip, cfg.kernels)
        report[r] = {"method": "rtn (no calibration tokens)", "samples": 0,
                     "rel_error": ((q.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()}
        w.data.copy_(q)
    return report


def _validate(model: nn.Module, cfg: QuantConfig, calib_ids) -> None:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.is_floating_point():
        raise OspEvalError("GPTQ calibration data must be a [nsamples, seqlen] tensor of token ids")
    maxpos = getattr(model.config, "max_position_embeddings", None)
    if maxpos is not None and calib_ids.shape[1] > maxpos:
        raise OspEvalError(f"--calib_seqlen {calib_ids.shape[1]} exceeds this model's max_position_embeddings "
                           f"({maxpos})")
    ad = get_adapter(model)
    for role, lin in ad.linears(ad.layers(model)[0]).items():
        try:
            _check_args(lin.in_features, cfg.w_groupsize, cfg.act_order, cfg.static_groups)
        except ValueError as e:
            raise OspEvalError(f"{e} ({role}_proj)") from None


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool = True, batch_size: int | None = None
) -> dict:
    """GPTQ all decoder-layer Linears of `model` in place, layer by layer (lm_head and embeddings stay).

    A model on the GPU stays there. A layer-streamed model (offload.stream_model) and a model on the CPU with a
    GPU present are processed one layer at a time on the GPU (offload.walk; the activations stay on the GPU).
    Windows go through the layers in batches of `batch_size` (default `cfg.extra["gptq_batch_size"]`, else 8 on
    GPU, 4 on CPU); the Hessians do not depend on it. Returns timing stats (also left on `model.osp_gptq_stats`).
    """
    if cfg.w_bits >= 16:
        return {}
    _validate(model, cfg, calib_ids)
    ad = get_adapter(model)
    layers = ad.layers(model)
    device = compute_device(model)
    offload = is_streamed(model) or (device.type == "cpu" and torch.cuda.is_available())
    if offload and device.type == "cpu" and torch.cuda.is_available():
        device = torch.device("cuda")
    bs = batch_size or cfg.extra.get("gptq_batch_size") or (8 if device.type == "cuda" else 4)

    t_start = time.perf_counter()
    inps, calls = capture_inputs(model, layers, calib_ids, bs, device)
    outs = torch.empty_like(inps)
    reports: list[dict] = [{} for _ in layers]
    layer_seconds = []

    def one(index, layer):
        nonlocal inps, outs
        t0 = time.perf_counter()
        linears = ad.linears(layer)
        tokens = ad.expert_tokens(layer)
        if tokens is not None:
            tokens.zero_()
        for group in ad.sequential_groups:
            members = {r: m for g in group for r, m in linears.items() if base_role(r) == g}  # the group's order
            reports[index] |= _quantize_group(layer, index, members, inps, calls, cfg)
        run_layer(layer, index, inps, calls, out=outs)  # the quantized layer feeds the next one
        inps, outs = outs, inps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        layer_seconds.append(time.perf_counter() - t0)
        return layer_seconds[-1]

    bar = tqdm(walk(layers, device, one, write_back=True), total=len(layers), desc="GPTQ", disable=not progress,
               leave=False)
    for seconds in bar:
        bar.set_postfix(layer_s=f"{seconds:.1f}")
    del inps, outs, calls
    stats = {
        "seconds": time.perf_counter() - t_start,
        "layer_seconds": layer_seconds,
        "batch_size": bs,
        "offload": offload,
        "nsamples": int(calib_ids.shape[0]),
        "seqlen": int(calib_ids.shape[1]),
    }
    if ad.experts:  # expert-aware report: calibration tokens routed to each expert, its weight change, fallbacks
        stats["experts"] = [{r: v for r, v in rep.items() if "." in r} for rep in reports]
        stats["expert_fallbacks"] = [f"layer {i} {r}" for i, rep in enumerate(reports) for r, v in rep.items()
                                     if v["method"] != "gptq"]
    log.info("GPTQ: %d layers in %.1f s (%.2f s per layer)", len(layers), stats["seconds"],
             sum(layer_seconds) / max(1, len(layer_seconds)))
    model.osp_gptq_stats = stats
    return stats
