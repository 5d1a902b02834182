"""GPTQ: hand-checkable cases, real-layer reconstruction against RTN, the model walk (hooks, Hessians,
batching), end to end on stories260K, and bad input."""

from __future__ import annotations

import copy
import weakref
from functools import partial

import pytest
import torch
from torch import nn

import osp_eval.gptq as gptq
from osp_eval.apply import quantize_
from osp_eval.arch import get_adapter
from osp_eval.config import QuantConfig
from osp_eval.data import calibration_ids, tokenize_text, wikitext2_text
from osp_eval.errors import OspEvalError
from osp_eval.gptq import HessianHooks, gptq_quantize_model, gptq_quantize_weight
from osp_eval.kernels import tf32_matmuls
from osp_eval.ppl import perplexity
from osp_eval.quant import fake_quant_weight
from osp_eval.runtime import ActSpec, install_input_transform


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """GPTQ's column loop and the clip search run many small ops: on a shared 2-core machine, OpenMP's
    second thread turns each into a ~10 ms wait. One thread is as fast unloaded and far faster loaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2/n Σ x xᵀ, n = windows (the first dim of a [windows, tokens, in] input; rows of a 2-D one)."""
    n = len(x)
    x = x.reshape(-1, x.shape[-1]).double()
    return (2 / n * x.T @ x).float()


# --------------------------------------------------------------------------- hand-checkable


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_one_column_equals_rtn(sym, clip):
    torch.manual_seed(0)
    w = torch.randn(16, 1)
    q = gptq_quantize_weight(w, torch.tensor([[3.7]]), 3, sym=sym, clip_search=clip)
    assert torch.equal(q, fake_quant_weight(w, 3, sym=sym, clip_search=clip))


@pytest.mark.parametrize("groupsize,act_order,static", [(-1, False, False), (8, False, False), (-1, True, False),
                                                        (8, True, True)])
def test_diagonal_hessian_equals_rtn(groupsize, act_order, static):
    # With a diagonal H, the upper Cholesky factor of H⁻¹ is diagonal: no error is propagated, so GPTQ
    # is RTN exactly, whatever the column order or group fitting.
    torch.manual_seed(0)
    w = torch.randn(10, 32)
    H = torch.diag(torch.rand(32) + 0.1)
    for sym in (True, False):
        q = gptq_quantize_weight(w, H, 4, groupsize, sym=sym, clip_search=True, act_order=act_order,
                                 static_groups=static)
        assert torch.equal(q, fake_quant_weight(w, 4, groupsize, sym=sym, clip_search=True))


@pytest.mark.parametrize("blocksize", [1, 2, 128])
def test_identical_inputs_hand_case(blocksize):
    # Three identical inputs: only the row sum matters. 4 bits, s = 0.7/7 = 0.1. Column 0: 0.33 -> 0.3,
    # error 0.03, which OBS spreads as +0.015 over the two other columns (H = c·11ᵀ, tiny damping):
    # 0.24 -> 0.255 -> 0.3 (RTN: 0.2), error -0.045 moves -0.7 to -0.73 -> -0.7: the per-row scale stays
    # the one of the original weight (a refit at -0.73 would give -0.73), whatever the block size.
    x = torch.randn(256, 1, generator=torch.Generator().manual_seed(0)).repeat(1, 3)
    w = torch.tensor([[0.33, 0.24, -0.7]])
    q = gptq_quantize_weight(w, hessian(x), 4, percdamp=1e-4, blocksize=blocksize)
    assert torch.allclose(q, torch.tensor([[0.3, 0.3, -0.7]]))
    assert torch.allclose(fake_quant_weight(w, 4), torch.tensor([[0.3, 0.2, -0.7]]))
    assert abs(q.sum() - w.sum()) < abs(fake_quant_weight(w, 4).sum() - w.sum())


def test_dead_input_zeroes_the_column():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    x[:, 2] = 0
    w = torch.randn(4, 6)
    q = gptq_quantize_weight(w, hessian(x), 4)
    assert torch.all(q[:, 2] == 0)
    assert torch.isfinite(q).all()


def test_stacked_rows_equal_separate():
    # Rows are independent: q/k/v stacked in one call give each Linear's own result.
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    H = hessian(x)
    a, b = torch.randn(8, 64), torch.randn(5, 64)
    both = gptq_quantize_weight(torch.cat([a, b]), H, 4, clip_search=True)
    sep = torch.cat([gptq_quantize_weight(a, H, 4, clip_search=True), gptq_quantize_weight(b, H, 4, clip_search=True)])
    assert torch.allclose(both, sep, atol=1e-6)


def test_keeps_dtype_and_16_bits_is_identity():
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    H = hessian(torch.randn(64, 8))
    assert gptq_quantize_weight(w, H, 4).dtype == torch.bfloat16
    assert gptq_quantize_weight(w, H, 16) is w


# --------------------------------------------------------------------------- bad input


def test_bad_groupsize_and_act_order_groups():
    w, H = torch.randn(4, 24), hessian(torch.randn(64, 24))
    with pytest.raises(ValueError, match="groupsize 16 does not divide in_features 24"):
        gptq_quantize_weight(w, H, 4, groupsize=16)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize_weight(w, H, 4, groupsize=8, act_order=True)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_weight(w, H[:8, :8], 4)


def test_model_bad_groupsize(stories):
    model, _ = stories
    ids = torch.randint(0, 512, (2, 32))
    with pytest.raises(OspEvalError, match="groupsize 5 does not divide"):
        gptq_quantize_model(model, QuantConfig(w_bits=4, w_method="gptq", w_groupsize=5), ids, progress=False)
    with pytest.raises(OspEvalError, match="token ids"):
        gptq_quantize_model(model, QuantConfig(w_bits=4, w_method="gptq"), ids.float(), progress=False)


# --------------------------------------------------------------------------- Hessian hooks


def test_hessian_sees_the_input_after_the_pre_hook():
    # An online transform (pre-hook) on the Linear: H must be of the transformed input.
    torch.manual_seed(0)
    lin = nn.Linear(8, 3, bias=False)
    signs = torch.tensor([1.0, -1, 1, 1, -1, 1, 1, 1])
    install_input_transform(lin, ActSpec(16), rotation=lambda x: 3 * x * signs)
    x = torch.randn(2, 5, 8)
    hooks = HessianHooks({"down": lin}, stop_early=False)
    try:
        with torch.no_grad():
            lin(x[:1])
            hooks.start_forward()
            lin(x[1:])
    finally:
        hooks.remove()
    assert torch.allclose(hooks.hessians["down"], hessian(3 * x * signs), rtol=1e-5, atol=1e-5)
    assert not lin._forward_hooks and len(lin._forward_pre_hooks) == 1


def test_hessian_running_mean_is_batch_independent():
    torch.manual_seed(0)
    lin = nn.Linear(6, 2)
    x = torch.randn(7, 4, 6)
    out = []
    for splits in ([7], [1] * 7, [3, 3, 1]):
        hooks = HessianHooks({"q": lin}, stop_early=False)
        with torch.no_grad():
            for chunk in x.split(splits):
                hooks.start_forward()
                lin(chunk)
        hooks.remove()
        assert hooks.nsamples["q"] == 7
        out.append(hooks.hessians["q"])
    for H in out:
        assert torch.allclose(H, hessian(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- real layers


def _layer_inputs(model, ids, layer_idx, roles, bs=4):
    """Inputs of some Linears of one decoder layer, for all windows; stops the forward after that layer."""
    ad = get_adapter(model)
    lins = ad.linears(ad.layers(model)[layer_idx])
    got = {r: [] for r in roles}

    def hook(role, module, args, out):
        got[role].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        if role == "down":
            raise gptq._StopForward

    handles = [lins[r].register_forward_hook(lambda m, a, o, r=r: hook(r, m, a, o)) for r in roles]
    try:
        with torch.no_grad():
            for i in range(0, len(ids), bs):
                try:
                    model(input_ids=ids[i : i + bs], use_cache=False)
                except gptq._StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {r: torch.cat(v) for r, v in got.items()}, {r: lins[r].weight.detach().float() for r in roles}


@pytest.fixture(scope="module")
def smollm2_layer3(_smollm2_state, data_dir):
    """SmolLM2-135M layer 3: q_proj, o_proj and down_proj inputs for 16 calibration + 8 held-out C4 windows
    of 256 tokens (a 4-layer copy of the model, so the forward stops early)."""
    from transformers import AutoModelForCausalLM

    sd, config, tok = _smollm2_state
    config = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 4})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.load_state_dict(sd, strict=False)
    model.eval().requires_grad_(False)
    ids, _ = calibration_ids(tok, "c4", 24, 256, data_dir_=data_dir)
    xs, ws = _layer_inputs(model, ids, 3, ("q", "o", "down"))
    out = {}
    for r in ws:
        x = xs[r].view(24, 256, -1)
        out[r] = (ws[r], hessian(x[:16]), x[:16].flatten(0, 1), x[16:].flatten(0, 1))
    return out


# (bits, groupsize, act_order, sym, clip): every option is on in some case, at 3 and 4 bits;
# act_order with groups uses static groups. The first case is the OSP protocol's.
CASES = [(4, -1, False, True, True), (3, -1, False, False, False), (4, -1, True, False, False),
         (3, -1, True, True, False), (4, 64, False, True, False), (3, 64, False, False, True),
         (4, 64, True, False, False), (3, 64, True, True, False)]


@pytest.mark.parametrize("bits,groupsize,act_order,sym,clip", CASES)
def test_real_layers_gptq_beats_rtn(smollm2_layer3, bits, groupsize, act_order, sym, clip):
    for role, (w, H, xc, xh) in smollm2_layer3.items():
        q = gptq_quantize_weight(w, H, bits, groupsize, sym=sym, clip_search=clip, act_order=act_order,
                                 static_groups=act_order and groupsize > 0)
        rtn = fake_quant_weight(w, bits, groupsize, sym=sym, clip_search=clip)
        err = lambda wq, x: ((w - wq) @ x.T).norm().item()
        # On the calibration inputs GPTQ must cut the output error clearly (typically to 0.5-0.75x).
        assert err(q, xc) < 0.9 * err(rtn, xc), f"{role} calibration: {err(q, xc):.4g} vs RTN {err(rtn, xc):.4g}"
        # Held out: q/o generalise (0.65-0.9x). down_proj (1536 inputs, 4096 heavy-tailed calibration
        # tokens) overfits at this data size (1.0-1.2x held out; ~1.04x still at 8192 tokens), so it is
        # not checked there.
        if role != "down":
            assert err(q, xh) < 0.95 * err(rtn, xh), f"{role} held-out: {err(q, xh):.4g} vs RTN {err(rtn, xh):.4g}"


@pytest.mark.parametrize("act_order", [False, True])
def test_real_layers_blocksize_does_not_matter(smollm2_layer3, act_order):
    # The lazy block update is exact algebra: only rare rounding ties may flip (seen: <0.05% of entries).
    # Catches an in-block propagation bug, which the comparison with RTN alone can miss.
    for role, (w, H, _, _) in smollm2_layer3.items():
        a = gptq_quantize_weight(w, H, 4, act_order=act_order)
        b = gptq_quantize_weight(w, H, 4, act_order=act_order, blocksize=32)
        assert ((a - b).abs() > 1e-6).float().mean() < 0.005, role


# --------------------------------------------------------------------------- the model walk


@pytest.fixture(scope="module")
def stories_calib(stories_path, data_dir):
    """32 C4 windows of 128 tokens for stories260K (tokenising C4 once for the module)."""
    from osp_eval.models import load_tokenizer

    return calibration_ids(load_tokenizer(stories_path), "c4", 32, 128, data_dir_=data_dir)[0]


def _all_hooks(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_model_walk_one_group_hessians_at_a_time_and_no_hooks_left(stories, stories_calib, monkeypatch):
    model, _ = stories
    ad = get_adapter(model)
    down = ad.linears(ad.layers(model)[0])["down"]
    install_input_transform(down, ActSpec(16), rotation=lambda x: x)  # a pre-existing hook must survive
    before = _all_hooks(model)
    alive, calls = [], []
    new_hessian = gptq._new_hessian
    quantize_weight = gptq.gptq_quantize_weight

    def tracked_new(n, device):
        H = new_hessian(n, device)
        alive.append(weakref.ref(H))
        return H

    def tracked_quantize(W, H, *a, **kw):
        live = [r() for r in alive if r() is not None]
        # q/k/v (and up/gate) share one input, hence one Hessian; nothing of earlier groups survives.
        assert len(live) == 1 and live[0] is H
        calls.append(tuple(W.shape))
        return quantize_weight(W, H, *a, **kw)

    monkeypatch.setattr(gptq, "_new_hessian", tracked_new)
    monkeypatch.setattr(gptq, "gptq_quantize_weight", tracked_quantize)
    cfg = QuantConfig(w_bits=4, w_method="gptq", w_clip=False)
    stats = gptq_quantize_model(model, cfg, stories_calib[:4, :64], progress=False, batch_size=3)
    assert _all_hooks(model) == before
    assert all(r() is None for r in alive)
    dims = ad.dims(model)
    kv = dims.num_kv_heads * dims.head_dim
    per_layer = [(2 * kv + dims.hidden, dims.hidden), (dims.hidden, dims.hidden),
                 (2 * dims.intermediate, dims.hidden), (dims.hidden, dims.intermediate)]
    assert calls == per_layer * dims.num_layers
    assert len(stats["layer_seconds"]) == dims.num_layers


def test_model_walk_hessians_match_a_plain_recomputation(stories, stories_calib, monkeypatch):
    """Every Hessian the walk hands to GPTQ (batches of 2 over 5 windows: an uneven last batch, so
    per-batch masks/positions matter) equals one recomputed independently: a replay copy of the model
    that holds exactly the weights quantized so far, fed one window per call from the token ids."""
    model, _ = stories
    ids = stories_calib[:5, :64]
    replay = copy.deepcopy(model)
    calls = []
    quantize_weight = gptq.gptq_quantize_weight

    def record(W, H, *a, **kw):
        Q = quantize_weight(W, H, *a, **kw)
        calls.append((W.clone(), H.clone(), Q.clone()))
        return Q

    monkeypatch.setattr(gptq, "gptq_quantize_weight", record)
    gptq_quantize_model(model, QuantConfig(w_bits=3, w_method="gptq", w_clip=False), ids, progress=False,
                        batch_size=2)
    ad = get_adapter(model)
    groups = ad.sequential_groups
    assert len(calls) == len(groups) * len(ad.layers(model))
    for i, (W, H, Q) in enumerate(calls):
        layer, group = ad.layers(replay)[i // len(groups)], groups[i % len(groups)]
        lins = ad.linears(layer)
        xs = _plain_inputs(replay, ids, lins, group)
        for r in group[1:]:  # the group's Linears share one input
            assert torch.equal(xs[r], xs[group[0]])
        H_ref = hessian(xs[group[0]])
        assert torch.allclose(H, H_ref, rtol=1e-4, atol=1e-5 * H_ref.abs().max().item()), (i, group)
        assert torch.equal(W, torch.cat([lins[r].weight for r in group]))
        for r, q in zip(group, Q.split([lins[r].weight.shape[0] for r in group])):
            lins[r].weight.data = q
    for (name, p), (_, p_ref) in zip(model.named_parameters(), replay.named_parameters()):
        assert torch.equal(p, p_ref), name


def _plain_inputs(model, ids, lins, group):
    """Inputs of the group's Linears, one window per call: [windows, tokens, in] per role."""
    xs = {r: [] for r in group}

    def grab(role, module, args, out):
        xs[role].append(args[0][0])
        if len({len(v) for v in xs.values()}) == 1:  # every Linear of the group has its input: stop
            raise gptq._StopForward

    hs = [lins[r].register_forward_hook(partial(grab, r)) for r in group]
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(input_ids=row[None], use_cache=False)
                except gptq._StopForward:
                    pass
    finally:
        for h in hs:
            h.remove()
    return {r: torch.stack(v) for r, v in xs.items()}


# --------------------------------------------------------------------------- end to end


def test_quantize_gptq_end_to_end(stories_path, stories_calib, data_dir):
    """quantize_ with GPTQ on 32 C4 windows, WikiText-2 PPL on 16 windows of 256.

    At 3 bits GPTQ must clearly beat RTN (observed ~135-150 vs 208, fp 124). At 4 bits RTN costs this
    64-wide model only ~5% PPL and GPTQ lands within noise of it (observed 125-132 vs 130 for different
    calibration sets), so there it must run, stay finite and not be clearly worse; the per-Linear
    reconstruction tests above are where GPTQ's 4-bit gain is checked.
    """
    from conftest import load

    model, tok = load(stories_path)
    calib = stories_calib
    test_ids = tokenize_text(tok, wikitext2_text("test", data_dir))
    ppl = lambda m: perplexity(m, test_ids, seqlen=256, batch_size=8, max_windows=16, progress=False)["ppl"]
    fp = ppl(model)
    res = {}
    for bits in (3, 4):
        rtn = ppl(quantize_(load(stories_path)[0], QuantConfig(w_bits=bits), progress=False))
        m = quantize_(load(stories_path)[0], QuantConfig(w_bits=bits, w_method="gptq"), calib, progress=False)
        assert m.osp_config.w_method == "gptq" and len(m.osp_gptq_stats["layer_seconds"]) == 5
        res[bits] = (ppl(m), rtn)
    (g3, rtn3), (g4, rtn4) = res[3], res[4]
    assert fp < g3 < 0.85 * rtn3, res
    assert fp < g4 < 1.05 * rtn4, res


@pytest.mark.parametrize("n", [1, 7, 128])
def test_fast_inverse_factor_is_the_upper_cholesky_of_the_inverse(n):
    """The GPU fast path's one-Cholesky factor U: upper triangular, positive diagonal, UᵀU = H⁻¹, and equal to
    the reference's three-step factor (checked in float64, against an independent inverse)."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(3 * n + 2, n, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, n, dtype=torch.float64)
    H = X.T @ X + 1e-3 * torch.eye(n, dtype=torch.float64)
    U = gptq._inverse_cholesky_upper(H, fast=True)
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(U, gptq._inverse_cholesky_upper(H), rtol=1e-9, atol=1e-12)
    with pytest.raises(OspEvalError, match="not positive definite"):
        gptq._inverse_cholesky_upper(-H, fast=True)


def test_tf32_switch_is_local():
    before = torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(ValueError), tf32_matmuls(True):
        raise ValueError
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("sym", [True, False])
def test_fast_linear_algebra_path_quantizes_as_well(sym):
    """The GPU fast path's linear algebra (one-Cholesky inverse factor, contiguous Vᵀ for the lazy update), forced
    on the CPU: equal to the reference arithmetic up to float rounding, so nearly every 4-bit weight is the same
    and the GPTQ objective tr((W-Q) H (W-Q)ᵀ) agrees to a fraction of a percent."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 384, generator=g) * torch.logspace(-1, 1, 384)
    X = torch.randn(2048, 384, generator=g) @ torch.randn(384, 384, generator=g)  # correlated inputs
    H = X.T @ X / len(X)
    ref = gptq_quantize_weight(W, H, 4, sym=sym, clip_search=True)
    fast = gptq_quantize_weight(W, H, 4, sym=sym, clip_search=True, fast_linalg=True)

    def objective(Q):
        d = (W - Q).double()
        return torch.einsum("ij,jk,ik->", d, H.double(), d).item()

    assert (fast != ref).float().mean() < 0.05
    assert objective(fast) == pytest.approx(objective(ref), rel=5e-3)
    rtn = fake_quant_weight(W, 4, sym=sym, clip_search=True)
    assert objective(fast) < 0.8 * objective(rtn)  # still GPTQ: well below RTN on correlated inputs
