"""SpinQuant rotation training: Cayley SGD stays on the manifold, trained rotations are exact rotations
of the model (16-bit invariance, train forward == eval forward), training lowers the quantized loss,
and R.bin round-trips into the evaluation path."""

import math

import pytest
import torch

from osp_eval import preset, quantize_
from osp_eval.arch import get_adapter
from osp_eval.data import calibration_ids
from osp_eval.errors import OspEvalError
from osp_eval.models import load_model
from osp_eval.rotation import load_rotations
from osp_eval.cli import main
from osp_eval.spinquant import (CayleySGD, cayley_sgd_step, mean_loss, prepare_training_model, save_rotations,
                                train_rotations)

A4KV4 = dict(a_bits=4, k_bits=4, v_bits=4)
# stories260K has no outlier channels: from its random Hadamards, 12 steps move the A4 (and even the A2)
# loss by little more than the rounding noise of a small rotation change (±0.03 on these windows). From no
# rotation (R = I), 10 steps at A2 gain 0.2-0.47 nats on held-out windows (4 data seeds), far above it.
A2 = dict(a_bits=2)


def _orth_err(r: torch.Tensor) -> float:
    r = r.double()
    return (r.T @ r - torch.eye(r.shape[0], dtype=torch.float64)).abs().max().item()


def _random_orthogonal(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q.to(dtype)


# ----------------------------------------------------------------------------- Cayley SGD
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cayley_keeps_orthogonality(dtype, momentum):
    """200 steps with large random gradients at SpinQuant's lr: R stays orthogonal and keeps moving."""
    g = torch.Generator().manual_seed(0)
    r = _random_orthogonal(96, 0, dtype)  # 96 = 12·8: sizes need not be powers of two
    start, buf = r.clone(), None
    for _ in range(200):
        r, buf = cayley_sgd_step(r, 10 * torch.randn(96, 96, generator=g).to(dtype), buf, lr=1.5, momentum=momentum)
    assert r.dtype == dtype
    assert _orth_err(r) < 1e-5
    assert (r - start).norm() > 1.0  # it did move: an identity "step" would pass the orthogonality check


def test_cayley_sgd_descends():
    """Riemannian descent on ‖R − Q‖²/2 over SO(n) converges to Q (a wrong sign or projection would not)."""
    s = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.matrix_exp(0.3 * (s - s.T))
    r = torch.nn.Parameter(torch.eye(32, dtype=torch.float64))
    opt = CayleySGD([r], lr=0.1, momentum=0.5)
    for _ in range(150):
        opt.zero_grad()
        loss = 0.5 * (r - target).pow(2).sum()
        loss.backward()
        opt.step()
    assert (r.detach() - target).norm() < 1e-3
    assert _orth_err(r.detach()) < 1e-12


# ----------------------------------------------------------------------------- training on stories260K
@pytest.fixture(scope="module")
def trained(stories_path, data_dir, tmp_path_factory):
    """W16A2 rotations trained in fp32 on C4 windows at SpinQuant's lr, from R = I; held-out loss before
    and after; R.bin saved."""
    model, tok = load_model(stories_path, dtype=torch.float32, device="cpu")
    windows, _ = calibration_ids(tok, "c4", 48, 64, 0, data_dir)
    train, held = windows[:16], windows[16:]
    cfg = preset("osp", **A2)
    rot = prepare_training_model(model, cfg, torch.eye(64), [torch.eye(8)] * 5)
    before = mean_loss(model, held, 16)
    losses = train_rotations(model, rot, train, steps=10, lr=1.5, batch_size=4, micro_batch_size=2, progress=False)
    after = mean_loss(model, held, 16)
    path = save_rotations(tmp_path_factory.mktemp("sq") / "R.bin", rot.state())
    return dict(model=model, rot=rot, cfg=cfg, before=before, after=after, losses=losses, path=str(path))


def test_training_lowers_quantized_loss(trained):
    print(f"held-out loss {trained['before']:.4f} -> {trained['after']:.4f}; "
          f"train losses {[round(x, 4) for x in trained['losses']]}")
    assert all(math.isfinite(x) for x in trained["losses"])
    assert trained["after"] < trained["before"] - 0.1
    assert _orth_err(trained["rot"].r1) < 1e-5


def test_round_trip_gives_identical_ppl(trained, stories_path, data_dir, tmp_path, monkeypatch):
    """The saved file puts exactly the trained rotations into the evaluation path (same PPL, bit for bit)."""
    from osp_eval import rotation
    from osp_eval.pipeline import run_ppl

    rot = trained["rot"]
    r1, r2s = load_rotations(trained["path"], get_adapter(trained["model"]).dims(trained["model"]))
    assert torch.equal(r1, rot.r1.detach().double()) and all(torch.equal(a, b.detach().double())
                                                             for a, b in zip(r2s, rot.r2))
    kw = dict(dtype="float32", device="cpu", data_dir=data_dir, seqlen=64, max_windows=3, progress=False,
              output_dir=str(tmp_path))
    from_file = run_ppl(stories_path, preset("osp", rotate=True, optimized_rotation_path=trained["path"], **A2), **kw)
    # The same rotations handed over in memory instead of through the file.
    monkeypatch.setattr(rotation, "draw_rotations",
                        lambda cfg, dims, device: (rot.r1.detach().double(), [r.detach().double() for r in rot.r2]))
    in_memory = run_ppl(stories_path, preset("osp", rotate=True, **A2), **kw)
    assert from_file["ppl"] == in_memory["ppl"]
    monkeypatch.undo()
    untrained = run_ppl(stories_path, preset("osp", rotate=True, **A2), **kw)
    assert abs(untrained["ppl"] - from_file["ppl"]) > 1e-3  # the rotations matter at A2: the check has teeth
    assert from_file["method"] == "spinquant_w16"


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """As in test_rotation.py: RMSNorm in the input's dtype, so float64 checks are strict."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def test_trained_rotation_is_invariant_and_matches_training_forward(stories_factory, data_dir, tmp_path,
                                                                    float64_rmsnorm):
    """float64: (1) with quantization off, the trained R.bin leaves the logits unchanged; (2) with A4KV4,
    the evaluation path computes the same loss as the training forward did with those rotations."""
    model, tok = stories_factory()
    model = model.double()
    windows, _ = calibration_ids(tok, "c4", 4, 32, 1, data_dir)
    cfg = preset("osp", center_embeddings=False, **A4KV4)
    rot = prepare_training_model(model, cfg)
    r1_init = rot.r1.detach().clone()
    train_rotations(model, rot, windows[:2], steps=3, lr=0.05, batch_size=2, micro_batch_size=2, progress=False,
                    checkpointing=False)
    assert rot.r1.dtype == torch.float64 and (rot.r1.detach() - r1_init).norm() > 1e-3  # it trained
    train_loss = mean_loss(model, windows[2:], 2)
    path = str(save_rotations(tmp_path / "R.bin", rot.state()))

    ids = windows[2:]
    ref, _ = stories_factory()
    ref = ref.double()
    with torch.no_grad():
        logits = ref(input_ids=ids).logits
    quantize_(ref, preset("osp", rotate=True, center_embeddings=False, optimized_rotation_path=path), progress=False)
    with torch.no_grad():
        err = ((ref(input_ids=ids).logits - logits).abs().max() / logits.abs().max()).item()
    assert err < 1e-9, err

    ev, _ = stories_factory()
    ev = ev.double()
    quantize_(ev, cfg.replace(rotate=True, optimized_rotation_path=path), progress=False)
    assert mean_loss(ev, windows[2:], 2) == pytest.approx(train_loss, abs=1e-9)


def test_cli_trains_and_saves(stories_path, data_dir, tmp_path):
    out = tmp_path / "rot" / "R.bin"
    rc = main(["spinquant-train", stories_path, "--a_bits", "4", "--kv_bits", "4", "--calib_data", "c4",
               "--data_dir", data_dir, "--dtype", "float32", "--device", "cpu", "--steps", "2",
               "--train_nsamples", "2", "--train_seqlen", "32", "--train_batch_size", "2", "--micro_batch_size", "1",
               "--save_path", str(out), "--no_progress"])
    assert rc == 0
    state = torch.load(out, weights_only=True)
    assert set(state) == {"R1"} | {f"model.layers.{i}.self_attn.R2" for i in range(5)}
    assert state["R1"].shape == (64, 64) and state["model.layers.4.self_attn.R2"].shape == (8, 8)
    import json

    meta = json.loads(out.with_name("R.bin.json").read_text())
    assert len(meta["losses"]) == 2 and meta["train_seconds"] > 0 and "peak_rss_gb" in meta
    assert meta["training_config"]["w_bits"] == 16  # GPTQ follows by default: W16 while training


# ----------------------------------------------------------------------------- bad input
def test_shape_mismatch_is_a_clear_error(stories, tmp_path):
    d = {"R1": torch.eye(64)} | {f"model.layers.{i}.self_attn.R2": torch.eye(16) for i in range(5)}
    torch.save(d, tmp_path / "R.bin")
    with pytest.raises(OspEvalError, match=r"R2 has shape \(16, 16\), this model needs \(8, 8\)"):
        quantize_(stories[0], preset("osp", rotate=True, optimized_rotation_path=str(tmp_path / "R.bin")),
                  progress=False)
    d = {"R1": torch.eye(64)} | {f"model.layers.{i}.self_attn.R2": torch.eye(8) for i in range(4)}
    torch.save(d, tmp_path / "R.bin")
    with pytest.raises(OspEvalError, match="missing model.layers.4.self_attn.R2"):
        load_rotations(str(tmp_path / "R.bin"), get_adapter(stories[0]).dims(stories[0]))


def test_cli_rejects_cross_head_hadamard(stories_path, data_dir, capsys):
    rc = main(["spinquant-train", stories_path, "--a_bits", "4", "--o_proj_input", "hadamard", "--calib_data", "c4",
               "--data_dir", data_dir, "--device", "cpu", "--steps", "1", "--no_progress"])
    assert rc == 2 and "per-head R2" in capsys.readouterr().err


@pytest.mark.parametrize("w_bits", [16, 4])
def test_cached_checkpointed_gradient_equals_plain_autograd(stories_path, data_dir, w_bits):
    """The fast path (rotated weights computed once per micro-batch in `parametrize.cached()`, decoder
    layers checkpointed) gives the same R1/R2 gradients as plain autograd through every weight access."""
    from torch.nn.utils import parametrize

    from osp_eval.spinquant import _materialize

    model, tok = load_model(stories_path, dtype=torch.float64, device="cpu")
    windows, _ = calibration_ids(tok, "c4", 2, 64, 0, data_dir)
    cfg = preset("osp", w_bits=w_bits, w_method="rtn", w_clip=False, **A4KV4)
    rot = prepare_training_model(model, cfg)
    model.train()

    def grads():
        return [p.grad.clone() for p in rot.parameters()]

    model(input_ids=windows, labels=windows, use_cache=False).loss.backward()
    plain = grads()
    rot.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with parametrize.cached():
        _materialize(model)
        model(input_ids=windows, labels=windows, use_cache=False).loss.backward()
    fast = grads()
    assert plain[0].abs().max() > 0
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_recomputed_rotations_same_gradients_less_saved_memory(stories_path, data_dir):
    """--recompute_rotations: the fp32 copies of a bf16 model's weights are not kept for the backward pass
    (what autograd keeps while the rotated weights are materialized is, apart from the frozen weights themselves,
    next to nothing), and the R1/R2 gradients are the plain path's bit for bit."""
    from torch.nn.utils import parametrize

    from osp_eval.spinquant import _materialize

    def run(recompute):
        model, tok = load_model(stories_path, dtype=torch.bfloat16, device="cpu")
        windows, _ = calibration_ids(tok, "c4", 2, 64, 0, data_dir)
        rot = prepare_training_model(model, preset("osp", w_bits=4, w_method="rtn", **A4KV4),
                                     recompute_rotations=recompute)
        model.train()
        frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        frozen |= {t.untyped_storage().data_ptr() for m in model.modules() if parametrize.is_parametrized(m)
                   for t in m.parametrizations.values() for t in [t.original]}
        saved = []

        def pack(t):  # bytes autograd keeps beyond references to the frozen weights
            if t.untyped_storage().data_ptr() not in frozen:
                saved.append(t.numel() * t.element_size())
            return t

        with parametrize.cached():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _materialize(model)
            model(input_ids=windows, labels=windows, use_cache=False).loss.backward()
        return sum(saved), [p.grad.clone() for p in rot.parameters()]

    plain_bytes, plain = run(False)
    lean_bytes, lean = run(True)
    assert plain[0].abs().max() > 0
    for a, b in zip(plain, lean):
        assert torch.equal(a, b)
    assert lean_bytes < plain_bytes / 20, (lean_bytes, plain_bytes)


def test_tf32_split_is_exact_and_tf32_representable():
    from osp_eval.spinquant import tf32_split

    x = torch.randn(257, generator=torch.Generator().manual_seed(0)) * torch.logspace(-20, 20, 257)
    hi, lo = tf32_split(x)
    assert torch.equal(hi + lo, x)  # nothing lost
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()  # hi fits TF32's 10 mantissa bits
    assert (lo.abs() <= x.abs() * 2**-10).all()


def test_frozen_rotation_forward_and_gradient():
    """The split GEMM behind GPU rotation training: w·r and dL/dr = wᵀ·G, checked against plain fp32 autograd (on
    the CPU the two halves run in fp32; on a GPU the same algebra runs on TF32 tensor cores)."""
    from osp_eval.spinquant import _FrozenRotation

    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 32, generator=g).to(torch.bfloat16)
    r = torch.linalg.qr(torch.randn(32, 32, generator=g))[0].requires_grad_(True)
    upstream = torch.randn(48, 32, generator=g)
    out = _FrozenRotation.apply(w, r)
    (grad,) = torch.autograd.grad((out * upstream).sum(), r)
    r_ref = r.detach().clone().requires_grad_(True)
    ref = w.float() @ r_ref
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), r_ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)
    # writer form: R1ᵀ·W = (Wᵀ·R1)ᵀ
    w2 = w.T.contiguous()  # [hidden, n]
    torch.testing.assert_close(_FrozenRotation.apply(w2.T, r).T, r.detach().T @ w2.float(), rtol=1e-5, atol=1e-6)


def test_split_rotations_only_for_bf16_weights_on_a_gpu():
    from types import SimpleNamespace

    from osp_eval.spinquant import split_rotations

    gpu_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # what the check reads of the weight
    assert split_rotations(gpu_bf16, torch.float32, kernels="fast")
    assert split_rotations(gpu_bf16, torch.float32, kernels="triton")
    for same_numbers in ("reference", "auto"):  # TF32 halves round R1's last bits away: not for auto
        assert not split_rotations(gpu_bf16, torch.float32, kernels=same_numbers)
    assert not split_rotations(SimpleNamespace(is_cuda=True, dtype=torch.float16), torch.float32, kernels="fast")
    assert not split_rotations(torch.zeros(2, dtype=torch.bfloat16), torch.float32)  # the CPU


def _train_cli(stories_path, data_dir, out, *extra):
    return main(["spinquant-train", stories_path, "--a_bits", "4", "--kv_bits", "4", "--calib_data", "c4",
                 "--data_dir", data_dir, "--dtype", "float32", "--device", "cpu", "--steps", "3",
                 "--train_nsamples", "4", "--train_seqlen", "32", "--train_batch_size", "2", "--momentum", "0.9",
                 "--save_path", str(out), "--no_progress", *extra])


def test_stopped_and_resumed_training_equals_one_run(stories_path, data_dir, tmp_path, capsys):
    """--max_train_seconds 0 stops after one step with an unfinished, identity-less R.bin; --resume continues with
    the same schedule, windows and momentum buffers: the rotations and losses of one uninterrupted run, bit for bit."""
    import json

    whole, parts = tmp_path / "a" / "R.bin", tmp_path / "b" / "R.bin"
    assert _train_cli(stories_path, data_dir, whole) == 0
    assert _train_cli(stories_path, data_dir, parts, "--max_train_seconds", "0") == 0
    assert "NOT finished" in capsys.readouterr().out
    meta = json.loads(parts.with_name("R.bin.json").read_text())
    assert (meta["steps_done"], meta["complete"], meta["identity"]) == (1, False, None)
    assert parts.with_name("R.bin.optim").is_file()
    assert _train_cli(stories_path, data_dir, parts, "--resume") == 0
    a, b = torch.load(whole, weights_only=True), torch.load(parts, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads(p.with_name("R.bin.json").read_text()) for p in (whole, parts))
    assert mb["losses"] == ma["losses"] and len(mb["losses"]) == 3
    assert (mb["steps_done"], mb["complete"], len(mb["segment_seconds"])) == (3, True, 2)
    assert not parts.with_name("R.bin.optim").exists()
    # resuming a finished run does nothing
    assert _train_cli(stories_path, data_dir, parts, "--resume") == 0
    assert torch.equal(torch.load(parts, weights_only=True)["R1"], b["R1"])


def test_resume_refuses_another_run(stories_path, data_dir, tmp_path, capsys):
    out = tmp_path / "R.bin"
    assert _train_cli(stories_path, data_dir, out, "--resume") == 2
    assert "no stopped run" in capsys.readouterr().err
    assert _train_cli(stories_path, data_dir, out, "--max_train_seconds", "0") == 0
    capsys.readouterr()
    assert _train_cli(stories_path, data_dir, out, "--resume", "--lr", "1.0") == 2
    err = capsys.readouterr().err
    assert "different run (lr: 1.5 there, 1.0 now)" in err and err.count("\n") == 1


def test_split_rotation_path_trains_like_the_plain_path(stories_path, data_dir, monkeypatch):
    """The GPU's rotation path (`_FrozenRotation` for every R1 product: readers, writers, o_proj's R2 columns after
    R1, v_proj's rows) wired through prepare_training_model, forced on the CPU, where its two halves run in fp32:
    the same loss and R1/R2 gradients as the plain fp32 path up to float rounding."""
    import osp_eval.spinquant as sq

    calls = []

    def counting(forward):
        def f(ctx, w, r):
            calls.append(tuple(w.shape))
            return forward(ctx, w, r)
        return staticmethod(f)

    def loss_and_grads(force_split: bool):
        if force_split:
            monkeypatch.setattr(sq, "split_rotations", lambda *a, **k: True)
            monkeypatch.setattr(sq._FrozenRotation, "forward", counting(sq._FrozenRotation.forward))
        model, tok = load_model(stories_path, dtype=torch.float32, device="cpu")
        windows, _ = calibration_ids(tok, "c4", 2, 64, 0, data_dir)
        rot = prepare_training_model(model, preset("osp", w_bits=4, w_method="rtn", w_clip=False, **A4KV4))
        model.train()
        loss = model(input_ids=windows, labels=windows, use_cache=False).loss
        loss.backward()
        monkeypatch.undo()
        return loss.item(), [p.grad.clone() for p in rot.parameters()]

    plain_loss, plain = loss_and_grads(False)
    split_loss, split = loss_and_grads(True)
    # embedding, lm_head and the 7 Linears of each of the 5 layers, once when registered (torch checks each
    # parametrization once) and once in the forward
    assert len(calls) == 2 * (2 + 7 * 5)
    assert split_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain[0].abs().max() > 0 and plain[1].abs().max() > 0
    for a, b in zip(plain, split):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * a.abs().max().item())


def test_negative_max_train_seconds_is_one_line(stories_path, data_dir, tmp_path, capsys):
    assert _train_cli(stories_path, data_dir, tmp_path / "R.bin", "--max_train_seconds", "-1") == 2
    err = capsys.readouterr().err
    assert "--max_train_seconds must be >= 0" in err and err.count("\n") == 1
