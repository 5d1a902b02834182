"""`quantize_(model, config)`: apply a QuantConfig to a loaded model, in place."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Dims, base_role, get_adapter
from .config import QuantConfig
from .errors import OspEvalError
from .quant import fake_quant_weight
from .runtime import (ATTN_IMPL, ATTN_IMPLS, ActSpec, KSpec, install_input_transform, install_output_quant,
                      register_attention, share_inputs)


def check_compatible(model: nn.Module, cfg: QuantConfig) -> Dims:
    """Raise a clear error for a config this model cannot run."""
    return check_dims(get_adapter(model).dims(model), cfg)


def check_dims(dims: Dims, cfg: QuantConfig) -> Dims:
    """check_compatible from the model's dimensions alone (preflight: before any weight is loaded)."""
    if cfg.k_groupsize not in (-1, dims.head_dim):
        raise OspEvalError(
            f"--k_groupsize {cfg.k_groupsize}: K is quantized per token and head, so it must be -1 or head_dim "
            f"({dims.head_dim})"
        )
    in_features = {"hidden": dims.hidden, "intermediate": dims.intermediate, "o_proj": dims.num_heads * dims.head_dim}
    for flag, g in (("--w_groupsize", cfg.w_groupsize), ("--a_groupsize", cfg.a_groupsize)):
        for what, n in in_features.items():
            if g > 0 and n % g:
                raise OspEvalError(f"{flag} {g} does not divide the {what} dimension {n} of this model")
    if cfg.rotate or cfg.rotate_down_proj or cfg.k_bits < 16:
        from .hadamard import is_supported, unsupported_message

        sizes = {"head_dim (Q/K Hadamard)": dims.head_dim} if cfg.k_bits < 16 else {}
        if cfg.rotate or cfg.rotate_down_proj:
            sizes["intermediate (down_proj Hadamard)"] = dims.intermediate
        if cfg.rotate:
            sizes["hidden (R1)"] = dims.hidden
            sizes["head_dim (R2)"] = dims.head_dim
        if cfg.o_proj_input == "hadamard":
            sizes["num_heads (cross-head Hadamard)"] = dims.num_heads
        for what, n in sizes.items():
            if not is_supported(n):
                raise OspEvalError(unsupported_message(n, what))
    return dims


def _act_specs(cfg: QuantConfig, dims: Dims) -> dict[str, ActSpec]:
    base = ActSpec(cfg.a_bits, not cfg.a_asym, cfg.a_clip_ratio, cfg.a_groupsize, kernels=cfg.kernels)
    specs = {role: base for role in ("q", "k", "v", "gate", "up", "down")}
    if cfg.o_proj_input == "per_head":
        # The reference quantizes the o_proj input per token and head, in every mode.
        specs["o"] = ActSpec(cfg.a_bits, not cfg.a_asym, cfg.a_clip_ratio, dims.head_dim, kernels=cfg.kernels)
    else:
        specs["o"] = base
    return specs


def install_activation_quant(model: nn.Module, cfg: QuantConfig, online: dict[str, object] | None = None) -> None:
    """Put an InputTransform on each decoder-layer Linear that needs one (lm_head stays full precision)."""
    ad, dims = get_adapter(model), get_adapter(model).dims(model)
    specs = _act_specs(cfg, dims)
    online = online or {}
    for layer in ad.layers(model):
        readers = {}  # Linears that read the same tensor: q/k/v of an attention, gate/up of an MLP or expert
        for role, linear in ad.linears(layer).items():
            base = base_role(role)  # every expert's down_proj gets the down_proj transform
            if cfg.a_bits < 16 or base in online:
                install_input_transform(linear, specs[base], online.get(base))
                group = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}.get(base)
                if group and base not in online:
                    readers.setdefault((role[len(base):], group), []).append(linear)  # "gate.5" -> ".5"
        for linears in readers.values():
            share_inputs(linears)


def set_activation_quant(model: nn.Module, enabled: bool) -> None:
    """Switch dynamic activation quantization on or off (online rotations stay active)."""
    for m in model.modules():
        if hasattr(m, "osp_input"):
            m.osp_input.quant_enabled = enabled


def install_kv_quant(model: nn.Module, cfg: QuantConfig) -> None:
    ad, dims = get_adapter(model), get_adapter(model).dims(model)
    register_attention()
    for layer in ad.layers(model):
        attn = ad.attention(layer)
        if cfg.k_bits < 16:
            # Per token and head, with 0 kept in range: the reference's K goes through its per-token path.
            attn.osp_k = KSpec(ActSpec(cfg.k_bits, not cfg.k_asym, cfg.k_clip_ratio, dims.head_dim, True,
                                       kernels=cfg.kernels))
        if cfg.v_bits < 16:
            v_spec = ActSpec(cfg.v_bits, not cfg.v_asym, cfg.v_clip_ratio, dims.head_dim, kernels=cfg.kernels)
            install_output_quant(ad.linears(layer)["v"], v_spec)
    if cfg.k_bits < 16:
        current = model.config._attn_implementation
        if current not in ATTN_IMPLS.values():
            model.set_attn_implementation(ATTN_IMPLS.get(current, ATTN_IMPL))


@torch.no_grad()
def rtn_quantize_weights(model: nn.Module, cfg: QuantConfig, progress: bool = True) -> None:
    """Round-to-nearest weights, layer by layer on the model's compute device (a layer-streamed model's layers
    visit it one at a time)."""
    from .offload import compute_device, walk

    ad = get_adapter(model)

    def one(i, layer):
        for linear in ad.linears(layer).values():
            linear.weight.data = fake_quant_weight(
                linear.weight.data, cfg.w_bits, cfg.w_groupsize, not cfg.w_asym, cfg.w_clip, cfg.kernels
            )

    layers = ad.layers(model)
    for _ in tqdm(walk(layers, compute_device(model), one, write_back=True), total=len(layers), desc="RTN",
                  disable=not progress, leave=False):
        pass


def set_kernels(model: nn.Module, kernels: str) -> None:
    """Switch every installed activation/K/V quantizer to `kernels` (osp_eval.kernels; the values do not change)."""
    import dataclasses

    from .kernels import check_kernels

    check_kernels(kernels)
    for m in model.modules():
        for holder, name in ((getattr(m, "osp_input", None), "act"), (getattr(m, "osp_output", None), "act")):
            if holder is not None:
                setattr(holder, name, dataclasses.replace(getattr(holder, name), kernels=kernels))
        if getattr(m, "osp_k", None) is not None:
            m.osp_k = dataclasses.replace(m.osp_k, act=dataclasses.replace(m.osp_k.act, kernels=kernels))
    if hasattr(model, "osp_config"):
        model.osp_config = model.osp_config.replace(kernels=kernels)


def quantize_(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor | None = None, progress: bool = True):
    """Apply `cfg` to `model` in place: rotations, weights (RTN or GPTQ), activations, KV cache.

    `calib_ids` ([nsamples, seqlen] token ids) is needed for GPTQ only.
    """
    cfg.validate()
    from .kernels import check_kernels

    check_kernels(cfg.kernels)
    get_adapter(model).prepare(model)
    check_compatible(model, cfg)
    online = {}
    if cfg.rotate or cfg.rotate_down_proj:
        from .rotation import rotate_model

        online = rotate_model(model, cfg)
    install_activation_quant(model, cfg, online)
    if cfg.w_bits < 16:
        if cfg.w_method == "gptq":
            if calib_ids is None:
                raise OspEvalError("GPTQ needs calibration data (calib_ids)")
            from .gptq import gptq_quantize_model

            set_activation_quant(model, False)  # the reference calibrates with activations unquantized
            try:
                gptq_quantize_model(model, cfg, calib_ids, progress=progress)
            finally:
                set_activation_quant(model, True)
        else:
            rtn_quantize_weights(model, cfg, progress)
    install_kv_quant(model, cfg)
    model.osp_config = cfg
    return model
