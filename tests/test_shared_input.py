"""Linears that read the same tensor (q/k/v, gate/up; per expert in MoE) quantize it once per call
(runtime.SharedInput): the same logits as quantizing it per Linear, fewer quantizer calls, nothing kept after
the forward, and no sharing while autograd records."""

import pytest
import torch

import test_families
import test_moe
from osp_eval import preset, quantize_
from osp_eval import quant
from osp_eval.runtime import SharedInput

CFG = dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", rotate=True, kernels="reference")


def _quantized(builder, family):
    model = builder.build(family, dtype=torch.float32)
    quantize_(model, preset("osp", **CFG), progress=False)
    return model


def _forward_counting(model, ids, monkeypatch):
    calls = []
    ref = quant.fake_quant_act
    monkeypatch.setattr(quant, "fake_quant_act", lambda *a, **k: calls.append(1) or ref(*a, **k))
    import osp_eval.runtime as rt

    monkeypatch.setattr(rt, "fake_quant_act", quant.fake_quant_act)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    monkeypatch.undo()
    return out, len(calls)


def _unshare(model):
    for m in model.modules():
        m.__dict__.pop("osp_shared", None)


@pytest.mark.parametrize("builder, family", [(test_families, "llama3"), (test_families, "phi3"),
                                             (test_moe, "qwen3_moe")])
def test_shared_input_quantization_is_exact_and_saves_calls(builder, family, monkeypatch):
    model = _quantized(builder, family)
    ids = builder.ids()
    shared, n_shared = _forward_counting(model, ids, monkeypatch)
    memos = {id(m.osp_shared): m.osp_shared for m in model.modules() if hasattr(m, "osp_shared")}
    assert memos and all(s.key is None and s.y is None for s in memos.values())  # nothing held after the forward
    _unshare(model)
    alone, n_alone = _forward_counting(model, ids, monkeypatch)
    assert torch.equal(shared, alone)
    layers = model.config.num_hidden_layers
    assert n_alone - n_shared >= 3 * layers  # at least q/k/v (2 saved) and gate/up (1 saved) per layer


def test_no_sharing_while_autograd_records():
    calls = []

    class T:  # an InputTransform stand-in
        act, rotation, quant_enabled = "a", None, True

        def __call__(self, x):
            calls.append(1)
            return x * 2

    s, t = SharedInput(3), T()
    x = torch.ones(3, requires_grad=True)
    for _ in range(3):
        s(t, x)
    assert len(calls) == 3 and s.key is None
    with torch.no_grad():
        for _ in range(3):
            s(t, x)
    assert len(calls) == 4 and s.key is None
    y = torch.ones(3)
    s(t, y)
    y.add_(1)  # changed in place: recomputed
    s(t, y)
    assert len(calls) == 6


@pytest.mark.parametrize("method", [dict(), dict(rotate_down_proj=True), dict(rotate=True)])
def test_quantized_model_traces_whole_under_torch_compile(method):
    """torch.compile sees one graph for the W4A4KV4 model (no graph break from the shared-input memo or the
    online Hadamard's factor cache), and the shared input is still taken: fewer quantizer ops than Linears."""
    model = test_families.build("llama3", dtype=torch.float32)
    quantize_(model, preset("osp", **{**CFG, "rotate": False, **method}), progress=False)
    ids = test_families.ids()
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits  # fills the Hadamard factor cache, as a warm-up does
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager")(input_ids=ids, use_cache=False).logits
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("method", [dict(), dict(rotate=True)])
def test_triton_kernels_stay_whole_under_torch_compile(method, monkeypatch):
    """With the Triton path, torch.compile keeps each kernel as one opaque custom op (osp_eval::fake_quant_act,
    osp_eval::hadamard_rows) in a single graph, and the compiled model computes the eager logits bit for bit."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from osp_eval import kernels as K

    if not K.triton_available():
        pytest.skip("triton does not import")
    model = test_families.build("llama3", dtype=torch.float32)
    quantize_(model, preset("osp", **{**CFG, "rotate": False, **method, "kernels": "triton"}), progress=False)
    ids = test_families.ids()
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("osp_eval.fake_quant_act" in o for o in ops)
    assert any("osp_eval.hadamard_rows" in o for o in ops)  # R3 (Q/K Hadamard + K quant): on whenever K is quantized
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager")(input_ids=ids, use_cache=False).logits
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)
