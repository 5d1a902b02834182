"""The Triton activation quantizer (osp_eval.kernels) against the reference quant.fake_quant_act, bit for bit.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are decorated);
on a CUDA machine the same tests also run the compiled kernel against the reference on the GPU.
"""

import importlib
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import osp_eval.kernels as K  # noqa: E402
from sm90 import sm90_ptx  # noqa: E402

K = importlib.reload(K)  # decorate the kernels under the interpreter even if imported earlier
from osp_eval.quant import fake_quant_act  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(shape, seed=0):
    """Random rows over 5 decades, plus the cases that break a quantizer: a massive outlier, an all-zero row,
    an all-positive and an all-negative row, a constant row, and exact ties (x / scale = k + 0.5)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, n)[torch.randperm(n, generator=g)]
    flat = x.view(-1, n)
    flat[1] = 0
    flat[2, n // 3] = 3e4  # outlier
    flat[3] = flat[3].abs()
    flat[4] = -flat[4].abs()
    flat[5] = 0.75
    ties = torch.tensor([7.0, 2.5, -3.5, 0.5, 1.5, -0.5, -8.0, 14.0, -1.0, 6.5])  # 4-bit sym scale 1 / asym 1.4
    flat[6, : len(ties)] = ties
    flat[6, len(ties):] = 0.5
    return x


def _bits_equal(a, b):
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


CASES = [  # groupsize, zero_in_range: per token (0 in range), per group, K (per head, 0 in range), V-like own range
    (-1, None), (64, None), (64, True), (32, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference_bit_for_bit(device, dtype):
    bad = []
    for shape in ((9, 256), (2, 7, 192), (8, 344)):  # 344 = 2·172: a non-power-of-two width (masked lanes)
        x = _inputs(shape).to(device=device, dtype=dtype)
        for bits in (2, 4, 8):
            for sym in (False, True):
                for clip in (1.0, 0.9, 0.37):
                    for g, zir in CASES:
                        if shape[-1] % max(g, 1):
                            continue
                        ref = fake_quant_act(x, bits, sym, clip, g, zir)
                        out = K.fake_quant_act_triton(x, bits, sym, clip, g, zir)
                        assert out.dtype == dtype and out.shape == x.shape
                        if not _bits_equal(out, ref):
                            bad.append((shape, bits, sym, clip, g, zir, (out.float() - ref.float()).abs().max().item()))
    assert not bad, f"{len(bad)} cases differ, e.g. {bad[:3]}"


def test_integer_codes_and_grid():
    """Independent of the reference: a sym 4-bit row with amax 7 has scale 1, so the codes are round-half-even
    of x, clamped to [-8, 7]; an all-zero row stays zero."""
    x = torch.tensor([[7.0, 2.5, -3.5, 0.5, 1.5, -0.5, -6.0, 3.49]] * 2)
    x[1] = 0
    out = K.fake_quant_act_triton(x, 4, sym=True)
    assert out[0].tolist() == [7.0, 2.0, -4.0, 0.0, 2.0, -0.0, -6.0, 3.0]
    assert out[1].abs().sum() == 0
    asym = K.fake_quant_act_triton(torch.tensor([[-1.0, 14.0, 2.5, 3.5]]), 4, sym=False)  # scale 1, zero 1
    assert asym[0].tolist() == [-1.0, 14.0, 2.0, 4.0]


def test_auto_is_reference_on_cpu_and_bad_values_rejected():
    from osp_eval import preset
    from osp_eval.errors import OspEvalError

    for k in ("auto", "reference", "fast"):
        assert K.resolve_kernels(k, "cpu") == "reference"
    cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4)
    # auto computes the reference's numbers (a label); fast and triton may round otherwise (identity)
    assert cfg.identity() == cfg.replace(kernels="reference").identity()
    for k in ("fast", "triton"):
        assert cfg.replace(kernels=k).identity() == {**cfg.identity(), "kernels": k}
    assert not K.inexact("auto") and not K.inexact("reference") and K.inexact("fast") and K.inexact("triton")
    assert "kernels" in cfg.to_dict()
    with pytest.raises(OspEvalError, match="kernels"):
        cfg.replace(kernels="cuda").validate()


def test_quantized_model_logits_identical():
    """A tiny Llama at W4A4KV4 with the down_proj Hadamard (non-power-of-two 172 = 172·1) and K/V quant:
    --kernels triton and reference give the same logits, bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osp_eval import preset, quantize_
    from osp_eval.apply import set_kernels

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=172, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    q = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", rotate_down_proj=True,
               kernels="reference")
    quantize_(model, q, progress=False)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        set_kernels(model, "triton")
        assert model.osp_config.kernels == "triton"
        tri = model(ids).logits
    assert torch.equal(ref, tri)




def test_compiles_for_hopper_without_fma_and_with_ieee_division():
    """The PTX for sm_90: no fused multiply-add (it would change `hi*c - lo*c`), IEEE division (Triton's default
    fp32 division is approximate)."""
    sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "G": "i32", "clip": "fp32", "maxq": "fp32",
           "inv_maxq": "fp32", **{k: "constexpr" for k in ("SYM", "ZERO_IN_RANGE", "CLIP", "RECIP", "BF16", "BLOCK_M",
                                                            "BLOCK_G")}}
    variants = [{"SYM": sym, "ZERO_IN_RANGE": True, "CLIP": True, "RECIP": True, "BF16": True, "BLOCK_M": 2,
                 "BLOCK_G": 2048} for sym in (False, True)]
    ptx = sm90_ptx("_fake_quant_rows", sig, variants)
    assert [("div.rn.f32" in p, "fma" in p) for p in ptx] == [(True, False)] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_block_kernel_matches_reference_loop(device):
    """GPTQ with the one-launch Triton block equals the per-column reference loop bit for bit: several blocks
    (300 columns: 128 + 128 + 44), a dead input, act_order, sym/asym, clip search. On CUDA the update variant
    (fma or not) is the one kernels.gptq_variant found to match there."""
    from osp_eval.gptq import gptq_quantize_weight

    g = torch.Generator().manual_seed(0)
    W = torch.randn(70, 300, generator=g) * torch.logspace(-1, 1, 300)
    X = torch.randn(700, 300, generator=g)
    X[:, 5] = 0
    H = (X.t() @ X).to(device)
    W = W.to(device)
    for sym, act_order in ((True, False), (False, False), (True, True)):
        ref = gptq_quantize_weight(W, H, 4, sym=sym, clip_search=True, act_order=act_order)
        fast = gptq_quantize_weight(W, H, 4, sym=sym, clip_search=True, act_order=act_order, kernels="triton")
        assert torch.equal(fast, ref), (sym, act_order, (fast != ref).sum().item())
    # groups are fitted inside the loop: the kernel is not used, the result is the reference's
    ref = gptq_quantize_weight(W, H, 4, groupsize=60, clip_search=True)
    assert torch.equal(gptq_quantize_weight(W, H, 4, groupsize=60, clip_search=True, kernels="triton"), ref)
