"""Architecture knowledge, one adapter per model family: where the q/k/v/o, gate/up/down, norms and
embeddings live. Everything else in osp_eval asks the adapter instead of guessing module names."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class DecoderAdapter:
    """A decoder-only family with pre-norm attention + gated MLP blocks (the Llama layout)."""

    family: str
    architectures: tuple[str, ...]
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    # --- model-level parts
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def embed(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.embed_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.lm_head_path)

    # --- layer-level parts
    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The seven Linears of a decoder layer, keyed by role (q, k, v, o, gate, up, down)."""
        attn, mlp = getattr(layer, self.attn), getattr(layer, self.mlp)
        return {
            "q": getattr(attn, self.q),
            "k": getattr(attn, self.k),
            "v": getattr(attn, self.v),
            "o": getattr(attn, self.o),
            "gate": getattr(mlp, self.gate),
            "up": getattr(mlp, self.up),
            "down": getattr(mlp, self.down),
        }

    def norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return getattr(layer, self.input_norm), getattr(layer, self.post_attn_norm)

    # GPTQ's true-sequential order: each group sees the outputs of the already-quantized ones.
    sequential_groups: tuple[tuple[str, ...], ...] = (("k", "v", "q"), ("o",), ("up", "gate"), ("down",))

    def dims(self, model: nn.Module) -> Dims:
        return self.config_dims(model.config)

    def config_dims(self, c) -> Dims:
        """Dims from a config alone (preflight checks run before the weights are loaded)."""
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return Dims(
            hidden=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
        )


ADAPTERS = (
    DecoderAdapter("llama", ("LlamaForCausalLM",)),
    DecoderAdapter("mistral", ("MistralForCausalLM",)),
    DecoderAdapter("qwen2", ("Qwen2ForCausalLM",)),
)
SUPPORTED = tuple(a for ad in ADAPTERS for a in ad.architectures)


def adapter_for_architecture(arch: str | None) -> DecoderAdapter:
    for ad in ADAPTERS:
        if arch in ad.architectures:
            return ad
    raise OspEvalError(f"unsupported architecture {arch!r}: osp-eval supports {', '.join(SUPPORTED)}")


def adapter_for_config(config) -> DecoderAdapter:
    """By `architectures`, or by `model_type` when a config has none (GGUF-derived configs)."""
    archs = getattr(config, "architectures", None)
    if archs:
        return adapter_for_architecture(archs[0])
    for ad in ADAPTERS:
        if ad.family == getattr(config, "model_type", None):
            return ad
    return adapter_for_architecture(f"model_type={getattr(config, 'model_type', None)}")


def get_adapter(model: nn.Module) -> DecoderAdapter:
    if type(model).__name__ in SUPPORTED:
        return adapter_for_architecture(type(model).__name__)
    return adapter_for_config(model.config)
