"""The vLLM fast path: run an osp-eval fake-quantized model inside a vLLM engine.

The Transformers model stays the source of truth. `VllmEngine(model, tok)` starts an in-process vLLM
engine from the model's config only (dummy weights), then `load(model)` pushes every weight of the
(quantized, rotated) state_dict and puts the model's own InputTransform objects on vLLM's fused Linears
as forward pre-hooks, so the online math is the same code. One engine serves many configs of one model:
call `load` again. Notes: /work/shared/docs/ENVIRONMENT.md §4.

- qkv_proj reads the one input q/k/v share: it takes their (equal) transform; gate_up_proj likewise.
- V fake quant is an output hook on the V rows of qkv_proj. K quant (with the Q/K Hadamard) is a pre-hook on
  vLLM's Attention module, which receives q/k after RoPE and before the KV-cache write: the cache then holds
  quantized keys, which is what the Transformers path computes by re-quantizing its cached keys every step
  (rotation and rounding are per token and head, hence deterministic).
- Mixture of experts: vLLM's fused MoE kernel never materializes an expert's down_proj input, so each MoE block's
  forward becomes `ExpertLoop` (per expert, the Transformers path's arithmetic and transforms) over the quantized
  expert weights written into vLLM's fused-experts parameters; attention, norms and the KV cache stay vLLM's.
- lighteval through vLLM: multiple-choice rows are scored from prompt log-probs (`score_rows_vllm`), generative
  tasks decode greedily in vLLM (`generate_vllm`), with the Transformers path's prompts and stop strings.
- One GPU (tensor_parallel_size 1). With TP > 1 vLLM's row-parallel Linears (o_proj, down_proj) each see a slice
  of every token's input, so per-token activation ranges and the down_proj Hadamard would be computed per slice,
  not over the row as in the reference; only weight-only configs would carry over unchanged. Not offered.
- Hooks only run with enforce_eager=True, and lm_head never runs hooks (it is never quantized anyway).
- Scoring asks for prompt log-probs without detokenization: decoding every prompt position's token is Python work
  (~30 us per position on our CPU profile, vs ~4 us without) that dwarfs a small model's GPU time.
- Per-token log-probs come from vLLM in fp32 (logits upcast before log_softmax); the Transformers path
  takes cross-entropy in the logits' dtype. Equal for fp32 models; bf16 runs differ slightly.
- Weight-only configs match the Transformers path to ~1e-5 per token. With activation quantization each
  Linear matches exactly on the same input, but vLLM's kernels differ from Transformers' by ~1e-6 and a
  4-bit per-token rounding can flip on that: SmolLM2 W4A4 QuaRot, 4 windows of 2048: PPL 255.25 (hf) vs
  248.15 (vllm); W4A8: 119.07 vs 119.02. Compare A4 numbers within one backend.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ADAPTERS, get_adapter, routed_sum
from .errors import OspEvalError
from .runtime import _input_pre_hook

# Head sizes the CPU attention backend accepts (ENVIRONMENT.md §4).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _import_vllm():
    # In-process engine: direct model access for hooks and weight pushes, and a fast start.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    # vLLM drops torch to 1 thread unless OMP_NUM_THREADS is set; this process also runs the HF model.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    # A full window of max_position_embeddings tokens needs 1-2 more slots (the one generated token); callers
    # check their windows against the model's positions. Set before any engine: vLLM caches its env vars.
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    # Greedy decoding never samples top-k/top-p: without this, CUDA engines import FlashInfer for its sampler.
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    try:
        import vllm
    except ImportError as e:
        raise OspEvalError(f"--backend vllm needs vLLM: run scripts/setup_vllm.sh ({e})") from e
    return vllm


def _plain_cpu_gemm(layer: nn.Module, remove_weight: bool) -> None:
    """Stand-in for vLLM's CPU GEMM dispatch: keep `layer.weight` and use F.linear.

    vLLM repacks CPU weights (oneDNN) and empties `layer.weight`, so later weight pushes would be ignored.
    """
    layer.cpu_linear = F.linear


def check_supported(model: nn.Module) -> None:
    """Clear errors for what the vLLM path cannot run, before starting an engine."""
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    ad = get_adapter(model)
    if not ad.vllm:
        tested = ", ".join(a.family for a in ADAPTERS if a.vllm)
        raise OspEvalError(f"the vLLM path is checked against Transformers for {tested} only, not {ad.family} "
                           "(its fused or post-norm layouts need their own hooks): use --backend hf")
    if arch not in ModelRegistry.get_supported_archs():
        raise OspEvalError(f"vLLM cannot load architecture {arch}: use --backend hf")
    head_dim = get_adapter(model).dims(model).head_dim
    if current_platform.is_cpu() and head_dim not in CPU_HEAD_SIZES:
        raise OspEvalError(
            f"vLLM's CPU attention does not support head_dim {head_dim} (allowed: "
            f"{', '.join(map(str, CPU_HEAD_SIZES))}): use --backend hf"
        )


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight under its HF name, lm_head included even when tied (the engine's lm_head is untied); but not the
    experts and routers of mixture-of-experts layers, which `_set_experts` puts in place itself."""
    ad = get_adapter(model)
    own = {id(m) for layer in ad.layers(model) if ad.expert_linears(layer) is not None
           for m in (ad.expert_linears(layer), *ad.routers(layer))}
    skip = tuple(f"{name}." for name, m in model.named_modules() if id(m) in own)
    sd = {k: v.detach() for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    for _, fused, parts in ad.fused:  # split projections go back under their own names; vLLM fuses them again
        for part in parts:
            sd = {k.replace(f".{fused}.{part}.", f".{part}."): v for k, v in sd.items()}
    sd.setdefault(f"{ad.lm_head_path}.weight", ad.lm_head(model).weight.detach())
    return sd


def _same(transforms: list, what: str = "q/k/v (and gate/up)") -> object:
    """The one transform of a fused Linear's parts (None when none has one); they must agree."""
    first = transforms[0]
    for t in transforms[1:]:
        same = (t is None) == (first is None) and (
            t is None or (t.act == first.act and t.rotation is first.rotation and t.quant_enabled == first.quant_enabled)
        )
        if not same:
            raise OspEvalError(f"the vLLM path needs {what} to share one input transform")
    return first


def _swap_hook(module: nn.Module, name: str, hook, *, pre: bool = True, **state) -> None:
    """Remove the hook whose handle is `module.<name>`, with the `state` attributes it reads; then, when `hook`
    is given, set `state` on the module and register `hook` (a pre-hook unless pre=False). Every push of a new
    config into the engine re-installs its hooks this way."""
    if hasattr(module, name):
        getattr(module, name).remove()
        for attr in (name, *state):
            delattr(module, attr)
    if hook is not None:
        for attr, value in state.items():
            setattr(module, attr, value)
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        setattr(module, name, register(hook))


def _set_input_hook(linear: nn.Module, transform) -> None:
    _swap_hook(linear, "osp_input_hook", _input_pre_hook if transform is not None else None, osp_input=transform)


def _v_output_hook(module: nn.Module, args, out):
    """Fake-quantize the V rows of the fused qkv output (vLLM Linears return (output, bias))."""
    y, bias = out if isinstance(out, tuple) else (out, None)
    lo = module.osp_v_start
    y = torch.cat([y[..., :lo], module.osp_v_quant(y[..., lo:])], dim=-1)
    return (y, bias) if isinstance(out, tuple) else y


def _set_v_hook(qkv: nn.Module, v_quant, v_start: int) -> None:
    _swap_hook(qkv, "osp_v_hook", _v_output_hook if v_quant is not None else None, pre=False,
               osp_v_quant=v_quant, osp_v_start=v_start)


def _k_pre_hook(module: nn.Module, args):
    """KSpec on vLLM's flat [tokens, heads * head_dim] q/k: the same math per (token, head) as on the
    Transformers path's [batch, heads, tokens, head_dim] (K's quant group is one head)."""
    q, k = args[0], args[1]
    d = module.osp_head_dim
    q2, k2 = module.osp_k(q.reshape(*q.shape[:-1], -1, d), k.reshape(*k.shape[:-1], -1, d))
    return (q2.reshape(q.shape), k2.reshape(k.shape)) + tuple(args[2:])


def _set_k_hook(attn: nn.Module, kspec, head_dim: int) -> None:
    _swap_hook(attn, "osp_k_hook", _k_pre_hook if kspec is not None else None, osp_k=kspec, osp_head_dim=head_dim)


def _install(vmodel: nn.Module, parts: list[dict]) -> None:
    """Runs in the engine's worker: one dict per decoder layer (see VllmEngine.load)."""
    layers = vmodel.model.layers
    if len(layers) != len(parts):
        raise OspEvalError(f"vLLM model has {len(layers)} layers, the Transformers model {len(parts)}")
    for layer, p in zip(layers, parts):
        attn, mlp = layer.self_attn, getattr(layer, p["mlp"])
        _set_input_hook(attn.qkv_proj, p["qkv"])
        _set_input_hook(attn.o_proj, p["o"])
        if "moe" in p:
            _set_experts(mlp, p["moe"])
        else:
            _set_input_hook(mlp.gate_up_proj, p["gate_up"])
            _set_input_hook(mlp.down_proj, p["down"])
        _set_v_hook(attn.qkv_proj, p["v_quant"], p["v_start"])
        _set_k_hook(attn.attn, p["k"], p["head_dim"])
        for name, gain in p["out_norms"].items():  # post-norm families under --rotate: R1ᵀ·diag(gain)·R1
            _swap_hook(getattr(layer, name), "osp_out_gain_hook", _out_gain_hook if gain is not None else None,
                       pre=False, osp_out_gain=gain)


def _out_gain_hook(module: nn.Module, args, out):
    if isinstance(out, tuple):  # a norm called with a residual returns (normed, residual)
        return (module.osp_out_gain(out[0]),) + tuple(out[1:])
    return module.osp_out_gain(out)


@dataclass
class ExpertLoop:
    """The forward of a vLLM mixture-of-experts block, replacing its fused kernel (which computes every expert's
    down_proj input inside one kernel, where no per-expert transform can reach it): the Transformers path's
    arithmetic (`arch.routed_sum`) on the weights in vLLM's fused-experts module.

    `weights.w13_weight` is [experts, 2·inter, hidden] with gate rows first, `weights.w2_weight` [experts, hidden,
    inter]: `_set_experts` writes them in this layout (vLLM's own kernel layout, prepacked on CPU, is not used).
    Routing is a copy of the Transformers router module, so softmax, top-k and renormalization (Mixtral always,
    Qwen3-MoE and OLMoE per `norm_topk_prob`) and their dtypes are the family's own."""

    router: nn.Module
    act_fn: Callable
    gate_up: nn.Module | None  # every expert's gate/up input transform (one, shared)
    down: nn.Module | None  # every expert's down_proj input transform: online Hadamard + activation quant
    weights: nn.Module

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.router(x)
        # Activation quant is per token (or per token and group): rows are independent, so transforming every
        # token once equals transforming, for each expert, the rows routed to it (what the Transformers path does).
        xq = self.gate_up(x) if self.gate_up is not None else x
        w13, w2 = self.weights.w13_weight, self.weights.w2_weight
        inter = w2.shape[-1]

        def expert(e: int, token: torch.Tensor) -> torch.Tensor:
            h = xq[token]  # gate and up as two GEMMs, as the Transformers path's two Linears compute them
            h = self.act_fn(F.linear(h, w13[e, :inter])) * F.linear(h, w13[e, inter:])
            return F.linear(self.down(h) if self.down is not None else h, w2[e])

        return routed_sum(x, top_k_index, top_k_weights, expert, w13.shape[0]).reshape(shape)


def _set_experts(block: nn.Module, moe: dict) -> None:
    """Write one layer's (quantized, rotated) expert weights into vLLM's fused-experts parameters and run the
    block through ExpertLoop with the layer's router and transforms."""
    holder = next((m for m in block.modules() if hasattr(m, "w13_weight") and hasattr(m, "w2_weight")), None)
    if holder is None:
        raise OspEvalError(f"this vLLM version's {type(block).__name__} has no w13_weight/w2_weight expert "
                           "parameters, which the vLLM path's expert loop uses: use --backend hf")
    to = dict(device=holder.w13_weight.device, dtype=moe["dtype"])
    # Replacing .data (not copying into it): vLLM may have repacked the parameter into a kernel layout of another
    # shape. One layer at a time, so the extra memory is one layer's experts.
    holder.w13_weight.data = torch.stack([torch.cat([g, u]) for g, u, _ in moe["weights"]]).to(**to)
    holder.w2_weight.data = torch.stack([d for _, _, d in moe["weights"]]).to(**to)
    block.forward = ExpertLoop(copy.deepcopy(moe["router"]).to(**to), moe["act_fn"], moe["gate_up"], moe["down"],
                               holder)


class VllmEngine:
    """An in-process vLLM engine shaped like one Transformers model; `load` pushes a quantized copy into it."""

    def __init__(self, model: nn.Module, tokenizer, *, max_model_len: int = 2049, seed: int = 0,
                 gpu_memory: float | None = None):
        """`gpu_memory`: the fraction of the GPU vLLM may take (weights + KV cache); the Transformers model
        lives on the same GPU, so the default leaves room for it ($OSP_EVAL_VLLM_GPU_MEMORY, else 0.45)."""
        vllm = _import_vllm()
        gpu_memory = gpu_memory or float(os.environ.get("OSP_EVAL_VLLM_GPU_MEMORY", 0.45))
        check_supported(model)
        import vllm.model_executor.layers.utils as vutils

        vutils.dispatch_cpu_unquantized_gemm = _plain_cpu_gemm  # looked up at load time: patch before LLM()
        self.dtype = next(model.parameters()).dtype
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._dir = tempfile.TemporaryDirectory(prefix="osp_vllm_")
        config = model.config.to_dict()
        # Rotations untie lm_head; an untied engine takes either kind (a tied model pushes lm_head = embed).
        config["tie_word_embeddings"] = False
        config.pop("quantization_config", None)
        config["architectures"] = getattr(model.config, "architectures", None) or [type(model).__name__]
        type(model.config).from_dict(config).save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(
                model=self._dir.name, load_format="dummy", dtype=str(self.dtype).replace("torch.", ""),
                enforce_eager=True,  # forward hooks run only in eager mode
                enable_prefix_caching=False,  # cached prefixes would outlive a weight push
                max_model_len=max_model_len, seed=seed,
                **({"gpu_memory_utilization": gpu_memory} if torch.cuda.is_available() else {}),
            )
        except Exception as e:  # vLLM raises many kinds; keep the first line
            raise OspEvalError(f"vLLM could not start for this model: {str(e).splitlines()[0] if str(e) else e!r}") from e
        self.start_seconds = time.perf_counter() - t0
        self.load(model)

    @torch.no_grad()
    def load(self, model: nn.Module) -> None:
        """Push `model`'s weights and online transforms (activation quant, online Hadamards, K and V quant)."""
        ad = get_adapter(model)
        dims = ad.dims(model)
        parts = []
        for layer in ad.layers(model):
            lin = ad.linears(layer)
            t = {role: getattr(m, "osp_input", None) for role, m in lin.items()}
            v_out = getattr(lin["v"], "osp_output", None)
            part = {
                "qkv": _same([t["q"], t["k"], t["v"]]), "o": t["o"], "mlp": ad.vllm_mlp,
                "v_quant": v_out, "v_start": (dims.num_heads + dims.num_kv_heads) * dims.head_dim,
                "k": getattr(ad.attention(layer), "osp_k", None), "head_dim": dims.head_dim,
                "out_norms": {n: getattr(getattr(layer, n), "osp_out_gain", None)
                              for n in (ad.attn_out_norm, ad.mlp_out_norm) if n},
            }
            experts = ad.expert_linears(layer)
            if experts is None:
                part |= {"gate_up": _same([t["gate"], t["up"]]), "down": t["down"]}
            else:  # references, not copies: _set_experts stacks them one layer at a time
                ex = experts.experts
                part["moe"] = {
                    "router": ad.routers(layer)[0], "act_fn": ex[0].act_fn,
                    "gate_up": _same([t[f"{r}.{e}"] for r in ("gate", "up") for e in range(len(ex))],
                                     "every expert's gate/up"),
                    "down": _same([t[f"down.{e}"] for e in range(len(ex))], "every expert's down_proj"),
                    "weights": [(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight) for m in ex],
                    "dtype": self.dtype,  # the engine's, as load_weights casts to
                }
            parts.append(part)
        sd = _state_dict(model)
        # The engine may hold another dtype/device than the HF model; load_weights copies into its params.
        self.llm.apply_model(lambda m: m.load_weights(iter(sd.items())))
        self.llm.apply_model(lambda m: _install(m, parts))
        self.llm.reset_prefix_cache()

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """For each prompt of L token ids, the fp32 log-probs [L-1] of tokens 1..L-1 given their prefixes."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for ids in prompts:
            if len(ids) + 1 > self.max_model_len:
                raise OspEvalError(f"a prompt of {len(ids)} tokens needs max_model_len >= {len(ids) + 1}")
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False),
                                 use_tqdm=False)
        res = []
        for ids, o in zip(prompts, outs):
            lp = o.prompt_logprobs  # entry 0 is None: the first token has no prefix
            res.append(torch.tensor([lp[j][ids[j]].logprob for j in range(1, len(ids))], dtype=torch.float32))
        return res


def perplexity_vllm(engine: VllmEngine, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
                    batch_size: int = 8, progress: bool = True) -> dict:
    """`ppl.perplexity` through vLLM: the same windows, each window's mean NLL averaged in fp32."""
    from tqdm.auto import tqdm

    from .ppl import make_windows, ppl_record

    windows = make_windows(ids, seqlen, max_windows)
    t0 = time.perf_counter()
    nlls = []
    for i in tqdm(range(0, len(windows), batch_size), desc="PPL (vLLM)", disable=not progress, leave=False):
        for lp in engine.prompt_logprobs(windows[i : i + batch_size].tolist()):
            nlls.append(-lp.mean())
    return ppl_record(torch.stack(nlls), windows, ids, seqlen, max_windows, time.perf_counter() - t0)


def score_rows_vllm(engine: VllmEngine, batch, max_length: int):
    """lighteval log-likelihood rows through vLLM: [(logprob sum, greedy == continuation, tokens cut)].

    The same truncation as the Transformers path (`lighteval_model.OspLightevalModel._score_rows`): at most
    `max_length` tokens are read, so the prompt holds max_length + 1 (its last token is only a target).
    Greedy means every continuation token has rank 1 among vLLM's log-probs.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, conts, cut = [], [], []
    for _, _, ctx, cont in batch:
        whole = ctx + cont
        prompt = whole[-(max_length + 1):]
        conts.append(len(cont) if len(cont) < len(prompt) else len(prompt) - 1)
        cut.append(max(0, len(whole) - len(prompt)))
        prompts.append(prompt)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                               SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False),
                               use_tqdm=False)
    res = []
    for p, n, c, o in zip(prompts, conts, cut, outs):
        lps = [o.prompt_logprobs[j][p[j]] for j in range(len(p) - n, len(p))]
        res.append((sum(lp.logprob for lp in lps), all(lp.rank == 1 for lp in lps), c))
    return res


def generate_vllm(engine: VllmEngine, prompts: list[list[int]], max_new_tokens: list[int],
                  stop: list[list[str]]) -> list[list[int]]:
    """Greedy generation in vLLM: for each prompt, the generated token ids (stopping at EOS, at one of its
    stop strings, or after its max_new_tokens). Callers decode and cut at the stop strings themselves, as the
    Transformers path does, so both backends post-process identically."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(max_tokens=n, temperature=0.0, stop=s or None) for n, s in zip(max_new_tokens, stop)]
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
