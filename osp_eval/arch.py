"""Architecture knowledge, one adapter per model family: where the q/k/v/o, gate/up/down, norms and
embeddings live. Everything else in osp_eval asks the adapter instead of guessing module names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import OspEvalError


@dataclass(frozen=True)
class Dims:
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


class SplitLinear(nn.Module):
    """A fused projection (Phi-3's qkv_proj, gate_up_proj) held as separate Linears whose outputs are
    concatenated. Per-output-channel weight quantization, GPTQ (rows are independent given the shared input
    Hessian), input rotations and input quantization act on each part exactly as on the fused weight, so
    splitting changes nothing the model computes, and every method sees ordinary q/k/v and gate/up Linears."""

    def __init__(self, fused: nn.Linear, parts: dict[str, int]):
        super().__init__()
        self.names = tuple(parts)
        start = 0
        for name, size in parts.items():
            lin = nn.Linear(fused.in_features, size, bias=fused.bias is not None,
                            device=fused.weight.device, dtype=fused.weight.dtype)
            lin.weight.data.copy_(fused.weight.data[start:start + size])
            if fused.bias is not None:
                lin.bias.data.copy_(fused.bias.data[start:start + size])
            lin.requires_grad_(fused.weight.requires_grad)
            setattr(self, name, lin)
            start += size
        if start != fused.out_features:
            raise OspEvalError(f"cannot split a fused projection of {fused.out_features} outputs into {parts}")

    def forward(self, x):
        return torch.cat([getattr(self, n)(x) for n in self.names], -1)


class ExpertMLP(nn.Module):
    """One expert of a mixture-of-experts block as three ordinary Linears."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        inter, hidden = gate_up.shape[0] // 2, gate_up.shape[1]
        kw = dict(bias=False, device=gate_up.device, dtype=gate_up.dtype)
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, **kw), nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)
        self.gate_proj.weight.data.copy_(gate_up[:inter])
        self.up_proj.weight.data.copy_(gate_up[inter:])
        self.down_proj.weight.data.copy_(down)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.Module):
    """transformers' stacked expert weights ([experts, 2·inter, hidden] and [experts, hidden, inter]) as one
    ExpertMLP per expert, with the same routing arithmetic: each expert sees only the tokens routed to it, so
    its input quantizer, online Hadamard and GPTQ Hessian see exactly those tokens. `tokens` counts the tokens
    each expert received since the last reset (GPTQ reports it)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.num_experts
        self.experts = nn.ModuleList(ExpertMLP(experts.gate_up_proj.data[e], experts.down_proj.data[e],
                                               experts.act_fn) for e in range(self.num_experts))
        self.tokens = torch.zeros(self.num_experts, dtype=torch.long)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        def expert(e, token):
            self.tokens[e] += len(token)
            return self.experts[e](hidden_states[token])

        return routed_sum(hidden_states, top_k_index, top_k_weights, expert, self.num_experts)


def routed_sum(hidden_states, top_k_index, top_k_weights, expert, num_experts: int) -> torch.Tensor:
    """transformers' expert dispatch: each token's output is the sum over its top-k experts of routing weight ×
    `expert(e, token)` (expert e run on the rows `token` routed to it). Shared by ExpertLinears and the vLLM path's
    expert loop, so both add the same terms in the same order."""
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique().tolist():
        if e >= num_experts:
            continue
        token, slot = torch.where(top_k_index == e)
        y = expert(e, token) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def base_role(role: str) -> str:
    """"gate.5" (expert 5's gate_proj) -> "gate"; dense roles are their own base."""
    return role.split(".", 1)[0]


@dataclass(frozen=True)
class DecoderAdapter:
    """A decoder-only family: attention + gated MLP blocks on a residual stream (the Llama layout and its
    relatives). Fields name the modules; the few family facts that change the rotation math are data too:

    - `attn_in_norm` / `mlp_in_norm`: the norms read by q/k/v and gate/up (None: the block reads the raw
      residual, as OLMo 2 does). Their gains are folded into the readers under --rotate.
    - `attn_out_norm` / `mlp_out_norm`: norms on a block's output before it joins the residual (Gemma's sandwich
      norms, OLMo 2's post-norms). Their gain does not commute with R1, so under --rotate the norm keeps a unit
      gain and the online matrix R1ᵀ·diag(gain)·R1 follows it (rotation.OutNormGain): exact at 16 bits.
    - `norm_offset`: Gemma's RMSNorm multiplies by (1 + w): the gain is w + offset.
    - `fused`: projections stored fused in the checkpoint, split into SplitLinear parts on load.
    - `attn_implementation`: the attention kernel the family needs (Gemma 2's logit soft-capping is eager-only).
    - `gguf_arch`: llama.cpp's `general.architecture` for the family, where transformers' GGUF loader builds it
      (None: it cannot). `gguf_keys`: (metadata key after "<arch>.", config attribute) pairs that loader drops;
      `gguf_qscale_layers`: Gemma's query_pre_attn_scalar is not in the file, llama.cpp uses hidden/heads for
      models of these layer counts (the 27Bs) and head_dim otherwise; `gguf_partial_rope`: the config can
      express RoPE on part of the head (`rope.dimension_count` < head_dim). See osp_eval/gguf.py.
    """

    family: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...] = ()
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_in_norm: str | None = "input_layernorm"
    mlp_in_norm: str | None = "post_attention_layernorm"
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    norm_offset: float = 0.0
    fused: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (attn|mlp, fused name, part names)
    attn_implementation: str = "sdpa"
    experts: str | None = None  # mixture of experts: the stacked experts module and the router, under `mlp`
    router: str = "gate"
    intermediate_attr: str = "intermediate_size"  # the expert width for MoE configs that have both
    vllm: bool = False  # the vLLM path's hooks were checked against Transformers for this family
    vllm_mlp: str = "mlp"  # the MLP / mixture-of-experts block in vLLM's decoder layer
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gguf_arch: str | None = None
    gguf_keys: tuple[tuple[str, str], ...] = (("attention.key_length", "head_dim"),)
    gguf_qscale_layers: tuple[int, ...] = ()
    gguf_partial_rope: bool = False
    notes: str = ""

    # --- model-level parts
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def embed(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.embed_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.lm_head_path)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Split fused projections into their parts and stacked experts into per-expert Linears (idempotent);
        call after loading, before anything else."""
        if self.experts:
            for layer in self.layers(model):
                mlp = getattr(layer, self.mlp)
                stacked = getattr(mlp, self.experts, None)
                if stacked is not None and not isinstance(stacked, ExpertLinears):
                    setattr(mlp, self.experts, ExpertLinears(stacked))
        if not self.fused:
            return model
        dims = self.dims(model)
        sizes = {"q_proj": dims.num_heads * dims.head_dim, "k_proj": dims.num_kv_heads * dims.head_dim,
                 "v_proj": dims.num_kv_heads * dims.head_dim, "gate_proj": dims.intermediate,
                 "up_proj": dims.intermediate}
        for layer in self.layers(model):
            for block, name, parts in self.fused:
                parent = getattr(layer, self.attn if block == "attn" else self.mlp)
                fused = getattr(parent, name)
                if not isinstance(fused, SplitLinear):
                    setattr(parent, name, SplitLinear(fused, {p: sizes[p] for p in parts}))
        return model

    # --- layer-level parts
    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The Linears of a decoder layer, keyed by role: q, k, v, o, gate, up, down; in a mixture-of-experts
        layer gate.E, up.E, down.E for each expert E (`base_role` gives the dense role)."""
        attn, mlp = getattr(layer, self.attn), getattr(layer, self.mlp)
        out = {"q": attn.get_submodule(self.q), "k": attn.get_submodule(self.k), "v": attn.get_submodule(self.v),
               "o": attn.get_submodule(self.o)}
        experts = getattr(mlp, self.experts, None) if self.experts else None
        if isinstance(experts, ExpertLinears):
            for e, ex in enumerate(experts.experts):
                out |= {f"gate.{e}": ex.gate_proj, f"up.{e}": ex.up_proj, f"down.{e}": ex.down_proj}
        elif experts is not None:
            raise OspEvalError("internal error: stacked experts not prepared (call adapter.prepare(model))")
        else:
            out |= {"gate": mlp.get_submodule(self.gate), "up": mlp.get_submodule(self.up),
                    "down": mlp.get_submodule(self.down)}
        return out

    def routers(self, layer: nn.Module) -> list[nn.Module]:
        """Modules with a [experts, hidden] `weight` that read the MLP's input: they stay full precision but are
        rotated and norm-folded like gate/up, so routing is unchanged at 16 bits."""
        mlp = getattr(layer, self.mlp)
        return [getattr(mlp, self.router)] if self.experts and hasattr(mlp, self.experts) else []

    def expert_linears(self, layer: nn.Module) -> ExpertLinears | None:
        """A mixture-of-experts layer's prepared experts (None for a dense layer)."""
        experts = getattr(getattr(layer, self.mlp), self.experts, None) if self.experts else None
        return experts if isinstance(experts, ExpertLinears) else None

    def expert_tokens(self, layer: nn.Module) -> torch.Tensor | None:
        experts = self.expert_linears(layer)
        return experts.tokens if experts is not None else None

    def norms(self, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        """The norms read by the attention and the MLP (None where a block reads the raw residual)."""
        return tuple(getattr(layer, n) if n else None for n in (self.attn_in_norm, self.mlp_in_norm))

    def out_norms(self, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        """The norms on the attention and MLP outputs (None for pre-norm-only families)."""
        return tuple(getattr(layer, n) if n else None for n in (self.attn_out_norm, self.mlp_out_norm))

    # GPTQ's true-sequential order: each group sees the outputs of the already-quantized ones.
    sequential_groups: tuple[tuple[str, ...], ...] = (("k", "v", "q"), ("o",), ("up", "gate"), ("down",))

    def dims(self, model: nn.Module) -> Dims:
        return self.config_dims(model.config)

    def config_dims(self, c) -> Dims:
        """Dims from a config alone (preflight checks run before the weights are loaded)."""
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return Dims(
            hidden=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=getattr(c, self.intermediate_attr),
            vocab=c.vocab_size,
        )


_GEMMA = dict(mlp_in_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
              mlp_out_norm="post_feedforward_layernorm", norm_offset=1.0)
ADAPTERS = (
    DecoderAdapter("llama", ("LlamaForCausalLM",), ("llama",), vllm=True, gguf_arch="llama",
                   notes="Llama 2/3.x (rope scaling, GQA), SmolLM"),
    DecoderAdapter("mistral", ("MistralForCausalLM",), ("mistral",), vllm=True, gguf_arch="llama"),
    DecoderAdapter("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), vllm=True, gguf_arch="qwen2", notes="q/k/v biases"),
    DecoderAdapter("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), vllm=True, gguf_arch="qwen3",
                   notes="per-head QK RMSNorm on q/k outputs: after R1 (input side), before RoPE and R3: unaffected"),
    DecoderAdapter("phi3", ("Phi3ForCausalLM",), ("phi3",), vllm=True, gguf_arch="phi3", gguf_partial_rope=True,
                   gguf_keys=(("attention.key_length", "head_dim"), ("attention.sliding_window", "sliding_window")),
                   fused=(("attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                          ("mlp", "gate_up_proj", ("gate_proj", "up_proj"))),
                   q="qkv_proj.q_proj", k="qkv_proj.k_proj", v="qkv_proj.v_proj",
                   gate="gate_up_proj.gate_proj", up="gate_up_proj.up_proj",
                   notes="fused qkv_proj / gate_up_proj split into exact parts"),
    DecoderAdapter("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), attn_implementation="eager", **_GEMMA,
                   gguf_arch="gemma2", gguf_qscale_layers=(46,),
                   gguf_keys=(("attention.key_length", "head_dim"), ("attn_logit_softcapping", "attn_logit_softcapping"),
                              ("final_logit_softcapping", "final_logit_softcapping")),
                   notes="(1+w) RMSNorm, sandwich norms, embedding scale, attention and final soft-capping"),
    DecoderAdapter("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), vllm=True, **_GEMMA,
                   gguf_arch="gemma3", gguf_qscale_layers=(62,),
                   notes="Gemma 2's layout plus per-head QK norm; sliding-window and global layers"),
    DecoderAdapter("olmo2", ("Olmo2ForCausalLM",), ("olmo2",), attn_in_norm=None, mlp_in_norm=None,
                   attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                   notes="post-norms only; whole-width QK norm on q/k outputs"),
    DecoderAdapter("granite", ("GraniteForCausalLM",), ("granite",), vllm=True,
                   notes="embedding, residual, attention and logit multipliers (all commute with rotations)"),
    DecoderAdapter("mixtral", ("MixtralForCausalLM",), ("mixtral",), experts="experts", vllm=True,
                   vllm_mlp="block_sparse_moe",
                   notes="mixture of experts: top-k router (kept full precision), per-expert gate/up/down"),
    DecoderAdapter("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), experts="experts", vllm=True,
                   intermediate_attr="moe_intermediate_size",
                   gguf_arch="qwen3moe", gguf_keys=(("attention.key_length", "head_dim"),
                                                    ("expert_feed_forward_length", "moe_intermediate_size")),
                   notes="mixture of experts + per-head QK norm"),
    DecoderAdapter("olmoe", ("OlmoeForCausalLM",), ("olmoe",), experts="experts", vllm=True,
                   notes="mixture of experts + whole-width QK norm"),
)
SUPPORTED = tuple(a for ad in ADAPTERS for a in ad.architectures)
FAMILIES = ", ".join(ad.family for ad in ADAPTERS)


def adapter_for_architecture(arch: str | None) -> DecoderAdapter:
    for ad in ADAPTERS:
        if arch in ad.architectures:
            return ad
    raise OspEvalError(f"unsupported architecture {arch!r}: osp-eval supports dense decoders of the families "
                       f"{FAMILIES} ({', '.join(SUPPORTED)})")


def adapter_for_config(config) -> DecoderAdapter:
    """By `architectures`, or by `model_type` when a config has none (GGUF-derived configs)."""
    archs = getattr(config, "architectures", None)
    if archs:
        return adapter_for_architecture(archs[0])
    for ad in ADAPTERS:
        if getattr(config, "model_type", None) in ad.model_types:
            return ad
    return adapter_for_architecture(f"model_type={getattr(config, 'model_type', None)}")


def get_adapter(model: nn.Module) -> DecoderAdapter:
    if type(model).__name__ in SUPPORTED:
        return adapter_for_architecture(type(model).__name__)
    return adapter_for_config(model.config)
