"""Kurtosis (PROTOCOL.md §6): the formula against hand-computed values, the two modes against plain
per-sequence forwards, real models end to end on a tiny token budget, and bad input."""

from __future__ import annotations

import argparse
import json
import types

import pytest
import torch
from torch import nn

from osp_eval.errors import OspEvalError
from osp_eval.kurtosis import add_cli, c4_kurtosis_text, excess_kurtosis, kurtosis, token_rows

NROWS, SEQLEN = 1, 64  # tiny budget: the two CPU cores are shared


# --- the formula -------------------------------------------------------------------------------------------

def test_gaussian_is_near_zero():
    torch.manual_seed(0)
    k = excess_kurtosis(torch.randn(4, 200_000, dtype=torch.float64))
    assert k.shape == (4,)
    assert (k.abs() < 0.05).all(), k  # standard error of the sample kurtosis: sqrt(24/n) ≈ 0.011


def test_spike_closed_form():
    # x = (a, 0, ..., 0) in d dims. Raw 4th moment a⁴/d; mean a/d; unbiased variance
    # (a² − d·(a/d)²)/(d−1) = a²/d, so std⁴ = a⁴/d² and κ = d − 3 for any a.
    # (A biased std would give d³/(d−1)² − 3 = 99.03 for d = 100, a centred moment less again.)
    d = 100
    for a in (1.0, 1e3):
        x = torch.zeros(d, dtype=torch.float64)
        x[17] = a
        assert excess_kurtosis(x).item() == pytest.approx(d - 3, rel=1e-9)


def test_non_centred_raw_moment():
    # x = (1, 1, 1, 3): raw 4th moment (1+1+1+81)/4 = 21; mean 1.5; squared deviations 0.25·3 + 2.25 = 3,
    # unbiased variance 3/3 = 1. κ = 21/1 − 3 = 18 (a centred 4th moment would give 1.3125 − 3 → 0).
    x = torch.tensor([[1.0, 1.0, 1.0, 3.0], [3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert excess_kurtosis(x).tolist() == pytest.approx([18.0, 18.0])


def test_relu_clamps_negative():
    # ±1 alternating, d = 8: raw 4th moment 1, unbiased variance 8/7, so κ = (7/8)² − 3 ≈ −2.23 → relu → 0.
    x = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    assert ((7 / 8) ** 2 - 3) < 0
    assert excess_kurtosis(x).item() == 0.0
    assert excess_kurtosis(x.view(1, 1, 8)).shape == (1, 1)


# --- the data ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def c4_text(data_dir):
    # The first documents only: the first tokens are those of the full 1000-document text, tokenised faster.
    return c4_kurtosis_text(data_dir, 20)


def test_text_is_docs_with_blank_lines(data_dir):
    from osp_eval.data import c4_docs

    docs = c4_docs(data_dir, 1000)
    text = c4_kurtosis_text(data_dir, 1000)
    assert len(docs) == 1000 and len(text) == sum(len(d) + 2 for d in docs)
    assert text.startswith(docs[0] + "\n\n" + docs[1] + "\n\n")
    assert text.endswith(docs[998] + "\n\n" + docs[999] + "\n\n")
    assert c4_kurtosis_text(data_dir, 20) == text[: sum(len(d) + 2 for d in docs[:20])]


def test_token_rows_default_special_tokens(stories, c4_text):
    _, tok = stories
    rows = token_rows(tok, c4_text, 3, 16)
    assert rows.shape == (3, 16)
    assert rows[0, 0].item() == tok.bos_token_id == 1  # default tokenizer settings: the Llama BOS is added
    assert rows.flatten().tolist() == tok(c4_text[:2000])["input_ids"][:48]


def test_too_little_text(stories):
    _, tok = stories
    with pytest.raises(OspEvalError, match=r"has \d+ tokens, fewer than the 640 needed \(10 rows × 64"):
        token_rows(tok, "Once upon a time.", 10, 64)


def test_too_few_documents(data_dir):
    with pytest.raises(OspEvalError, match="only 1025 documents"):
        c4_kurtosis_text(data_dir, 5000)


# --- the modes, against plain forwards ---------------------------------------------------------------------

def _manual(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-state kurtosis of one sequence [1, T], averaged over its tokens (no batching tricks)."""
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.stack([excess_kurtosis(h[0].float()).mean() for h in hs])


def test_modes_match_plain_forwards(stories, c4_text):
    model, tok = stories
    rows = token_rows(tok, c4_text, 2, 12)
    ref = kurtosis(model, rows, "reference", progress=False)
    ctx = kurtosis(model, rows, "context", progress=False)
    # reference: each token is its own sequence of length 1
    want_ref = torch.stack([torch.stack([_manual(model, t.view(1, 1)) for t in r]).mean(0) for r in rows])
    want_ctx = torch.stack([_manual(model, r.view(1, -1)) for r in rows])
    assert ref["per_layer"] == pytest.approx(want_ref.mean(0).tolist(), rel=1e-4, abs=1e-5)
    assert ctx["per_layer"] == pytest.approx(want_ctx.mean(0).tolist(), rel=1e-4, abs=1e-5)
    assert ref["kurtosis"] == pytest.approx(want_ref.mean().item(), rel=1e-4)
    assert len(ref["per_layer"]) == ref["hidden_states"] == model.config.num_hidden_layers + 1
    assert ref["tokens"] == 24 and ref["mode"] == "reference"
    assert ref["kurtosis"] != pytest.approx(ctx["kurtosis"], rel=1e-2)  # context changes the hidden states


def test_context_longer_than_positions(stories):
    model, _ = stories
    with pytest.raises(OspEvalError, match="max_position_embeddings"):
        kurtosis(model, torch.ones(1, 1024, dtype=torch.long), "context", progress=False)


def test_unknown_mode(stories):
    with pytest.raises(OspEvalError, match="unknown kurtosis mode"):
        kurtosis(stories[0], torch.ones(1, 4, dtype=torch.long), "sideways", progress=False)


class _NoHiddenStates(nn.Module):
    """A model that ignores output_hidden_states."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        return types.SimpleNamespace(hidden_states=None, last_hidden_state=torch.zeros(*input_ids.shape, 4))


def test_no_hidden_states():
    with pytest.raises(OspEvalError, match="returned no hidden states"):
        kurtosis(_NoHiddenStates(), torch.ones(1, 4, dtype=torch.long), "reference", progress=False)


# --- real models end to end --------------------------------------------------------------------------------

def _cli(argv: list[str]):
    p = argparse.ArgumentParser(prog="osp-eval")
    add_cli(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    args.func(args)


def test_cli_stories_both_modes(stories_path, data_dir, tmp_path, capsys):
    _cli(["kurtosis", stories_path, "--mode", "both", "--nrows", str(NROWS), "--seqlen", str(SEQLEN),
          "--data_dir", data_dir, "--output_dir", str(tmp_path), "--device", "cpu", "--no_progress"])
    printed = capsys.readouterr().out
    files = list((tmp_path / "kurtosis" / "stories260K").glob("*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    assert rec["kind"] == "kurtosis" and rec["method"] == "fp" and rec["config"]["w_bits"] == 16
    assert set(rec["results"]) == {"reference", "context"}
    assert rec["state_names"] == ["embeddings", "layer 1", "layer 2", "layer 3", "layer 4", "final norm"]
    assert "torch" in rec["versions"] and rec["tokenize_seconds"] >= 0
    for mode, res in rec["results"].items():
        assert res["tokens"] == NROWS * SEQLEN and len(res["per_layer"]) == 6
        assert 0.5 < res["kurtosis"] < 10, (mode, res["kurtosis"])  # no outliers: ~2.6 on the full protocol
        assert f"kurtosis ({mode}) = {res['kurtosis']:.4f}" in printed
    assert "final norm" in printed and "overall" in printed


def test_smollm2_far_above_stories_until_rotated(smollm2, stories, c4_text):
    """One test, so SmolLM2's unrotated numbers are computed once (the CPU budget is small)."""
    from osp_eval.apply import quantize_
    from osp_eval.config import preset

    modes = ("reference", "context")
    got = {}
    for name, (model, tok) in (("smollm2", smollm2), ("stories", stories)):
        rows = token_rows(tok, c4_text, NROWS, SEQLEN)
        got[name] = {m: kurtosis(model, rows, m, progress=False)["kurtosis"] for m in modes}
    model, tok = smollm2
    quantize_(model, preset("osp", rotate=True), progress=False)  # R1 spreads channel 507 over all channels
    rows = token_rows(tok, c4_text, NROWS, SEQLEN)
    got["smollm2 rotated"] = {m: kurtosis(model, rows, m, progress=False)["kurtosis"] for m in modes}
    print(got)
    for m in modes:
        assert got["smollm2"][m] > 30, got  # massive activations: ~80 on the full protocol (context mode)
        assert got["stories"][m] < 10, got
        assert got["smollm2"][m] > 10 * got["stories"][m], got
        assert got["smollm2 rotated"][m] < got["smollm2"][m] / 10, got
