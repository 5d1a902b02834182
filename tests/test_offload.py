"""Layer-streamed execution (offload.py) on CPU: the streamed paths give the same numbers as the normal ones,
`decide` picks streaming from byte counts, and the offload flag is recorded but never part of a result's identity."""

import pytest
import torch

from osp_eval import preset, quantize_
from osp_eval.arch import get_adapter
from osp_eval.errors import OspEvalError
from osp_eval.offload import GiB, decide, place, restore, stream_model
from osp_eval.ppl import window_nlls

from conftest import load


def _stream(model):
    return stream_model(model, get_adapter(model).layers(model), "cpu")


def _tiny_qwen2(seed=0):
    """A random Qwen2 (q/k/v biases, GQA 4/2 heads); sizes the Hadamards support."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    model.config.architectures = ["Qwen2ForCausalLM"]
    return model


def test_streamed_ppl_equals_the_normal_path_on_stories(stories_path, data_dir):
    from osp_eval.data import tokenize_text, wikitext2_text
    from osp_eval.ppl import make_windows

    model, tok = load(stories_path)
    windows = make_windows(tokenize_text(tok, wikitext2_text("test", data_dir)), 128, 6)
    plain = window_nlls(model, windows, batch_size=4, progress=False)  # batches of 4 and 2
    streamed = window_nlls(_stream(model), windows, batch_size=4, progress=False)
    assert torch.isfinite(plain).all() and plain.shape == (6,)
    assert torch.equal(plain, streamed)


@pytest.mark.parametrize("method", ["rtn", "gptq", "quarot"])
def test_streamed_quantization_equals_the_normal_path(method):
    cfgs = {"rtn": dict(w_method="rtn", rotate_down_proj=True), "gptq": dict(w_method="gptq", rotate_down_proj=True),
            "quarot": dict(w_method="gptq", rotate=True)}
    cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, nsamples=4, calib_seqlen=32, **cfgs[method])
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(2))
    plain, streamed = _tiny_qwen2(), _stream(_tiny_qwen2())
    before = window_nlls(plain, windows, progress=False)
    quantize_(plain, cfg, calib, progress=False)
    quantize_(streamed, cfg, calib, progress=False)
    a, b = plain.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    nll = window_nlls(plain, windows, batch_size=2, progress=False)
    assert not torch.equal(nll, before)  # the quantization did something
    assert torch.equal(nll, window_nlls(streamed, windows, batch_size=2, progress=False))
    del streamed.osp_stream  # the streamed model's whole forward agrees too
    assert torch.equal(plain(windows).logits, streamed(windows).logits)


def test_streamed_kurtosis_equals_the_normal_path(stories_path):
    from osp_eval.kurtosis import kurtosis

    model, _ = load(stories_path)
    rows = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    for mode in ("reference", "context"):
        plain = kurtosis(model, rows, mode, progress=False)
        streamed = kurtosis(_stream(model), rows, mode, progress=False)
        del model.osp_stream
        assert plain["per_layer"] == streamed["per_layer"] and len(plain["per_layer"]) == 6


def test_place_and_restore_keep_parameter_objects():
    lin = torch.nn.Linear(4, 3)
    w = lin.weight
    before = place(lin, "cpu", pin=False)
    assert lin.weight is w and before[0].data_ptr() == w.data_ptr()
    restore(lin, [torch.zeros(3, 4), torch.ones(3)])
    assert lin.weight is w and w.abs().sum() == 0 and lin.bias.sum() == 3


def test_decide():
    g80, h128 = 80 * GiB, 128 * GiB
    kw = dict(gpu_bytes=g80, host_bytes=h128)
    assert decide("auto", 16 * GiB, "cuda", **kw) is False  # an 8B in bf16 fits an 80 GB GPU
    assert decide("auto", 75 * GiB, "cuda", **kw) is True  # fits the GPU but not with the margin
    assert decide("on", 16 * GiB, "cuda", **kw) is True
    assert decide("off", 100 * GiB, "cuda", **kw) is False
    assert decide("auto", 100 * GiB, "cpu") is False and decide("on", GiB, "cpu") is True
    with pytest.raises(OspEvalError) as e:
        decide("auto", 140 * GiB, "cuda", **kw)  # a 70B in bf16 fits neither
    msg = str(e.value)
    assert "\n" not in msg and "140.0 GiB" in msg and "80.0 GiB" in msg and "128.0 GiB" in msg
    with pytest.raises(OspEvalError):
        decide("sometimes", GiB, "cuda", **kw)


def test_whole_model_paths_refuse_what_does_not_fit_one_gpu():
    from osp_eval.offload import check_fits_whole

    check_fits_whole(16 * GiB, "cuda", "lighteval", gpu_bytes=80 * GiB)
    check_fits_whole(500 * GiB, "cpu", "lighteval")  # the CPU path has no such limit
    with pytest.raises(OspEvalError) as e:
        check_fits_whole(131 * GiB, "cuda:0", "lighteval", gpu_bytes=78 * GiB)
    msg = str(e.value)
    assert "\n" not in msg and "131.0 GiB" in msg and "78.0 GiB" in msg and "--devices" in msg


def test_offload_is_recorded_not_identity(stories_path, data_dir, tmp_path):
    from osp_eval.pipeline import evaluate_ppl

    kw = dict(device="cpu", data_dir=data_dir, seqlen=64, max_windows=3, batch_size=2, output_dir=tmp_path,
              progress=False)
    cfg = preset("osp", w_bits=4, a_bits=8, w_method="rtn", rotate_down_proj=True)
    on, off = evaluate_ppl(stories_path, cfg, offload="on", **kw), evaluate_ppl(stories_path, cfg, offload="off", **kw)
    assert on["offload"]["streamed"] and not off["offload"]["streamed"]
    assert on["identity"] == off["identity"] and on["result_path"] == off["result_path"]
    assert on["ppl"] == off["ppl"]
    for r in (on, off):
        assert r["peak_memory"]["host_peak_rss_gb"] > 0
    graphs = evaluate_ppl(stories_path, cfg, cuda_graphs=True, **kw)  # a CUDA-only speed path: recorded, no-op here
    assert graphs["cuda_graphs"] is False and off["cuda_graphs"] is False
    assert graphs["identity"] == off["identity"] and graphs["ppl"] == off["ppl"]


def test_compile_is_its_own_cell_and_matches_eager(stories_path, data_dir, tmp_path):
    """--compile: the compiled forward scores the windows (one graph, logits within float rounding of eager, a last
    smaller batch run eagerly), the record says what compile did, and the cell is cached apart from eager's."""
    from osp_eval.pipeline import evaluate_ppl

    kw = dict(device="cpu", data_dir=data_dir, seqlen=64, max_windows=5, batch_size=2, output_dir=tmp_path,
              progress=False)
    cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", rotate_down_proj=True,
                 kernels="reference")
    eager = evaluate_ppl(stories_path, cfg, **kw)
    compiled = evaluate_ppl(stories_path, cfg, compile=True, **kw)
    c = compiled["compiled"]
    assert c["graph_breaks"] == 0 and c["compile_seconds"] > 0 and c["max_abs_logit_diff_vs_eager"] < 1e-3
    assert compiled["ppl"] == pytest.approx(eager["ppl"], rel=1e-4) and compiled["nwindows"] == 5
    assert compiled["identity"] == {**eager["identity"], "compile": True}
    assert compiled["result_path"] != eager["result_path"] and "compiled" not in eager
    for bad in (dict(cuda_graphs=True), dict(backend="vllm"), dict(offload="on")):
        with pytest.raises(OspEvalError, match="--compile"):
            evaluate_ppl(stories_path, cfg, compile=True, **{**kw, **bad})
