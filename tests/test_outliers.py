"""Outliers: SmolLM2's massive activation channel, hooks against output_hidden_states, plots, the CLI,
and what rotation does to both."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from osp_eval.errors import OspEvalError
from osp_eval.kurtosis import c4_kurtosis_text, token_rows
from osp_eval.outliers import ROLES, add_cli, collect_outliers, plot_layer_map, plot_layers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def c4_text(data_dir):
    # The first documents only: the first tokens are those of the full 1000-document text, tokenised faster.
    return c4_kurtosis_text(data_dir, 20)


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_smollm2_massive_channel(smollm2, c4_text, tmp_path):
    model, tok = smollm2
    windows = token_rows(tok, c4_text, 1, 32)
    res = collect_outliers(model, windows, progress=False)
    top = max(res["residual"], key=lambda r: r["max_abs"])
    # SmolLM2's massive activation: channel 507, tens of thousands, on the first token (ENVIRONMENT.md: ~25k)
    assert top["top_channels"][0]["channel"] == 507
    assert top["max_abs"] > 5000, top
    assert top["top_tokens"][0]["position"] == 0 and top["top_tokens"][0]["channel"] == 507
    assert top["max_abs"] > 1000 * top["median_abs_window0"]
    assert len(res["residual"]) == 31 and len(res["linear_inputs"]) == 30
    # the down_proj input that writes it (layer 12 in SmolLM2) is itself in the thousands
    assert max(r["down"] for r in res["linear_inputs"]) > 1000
    title = "SmolLM2 test"
    a = plot_layers(res, tmp_path / "layers.png", title)
    b = plot_layer_map(res, top["index"], tmp_path / "map.png", title, [tok.decode([int(t)]) for t in windows[0]])
    assert _is_png(a) and _is_png(b)


def test_hooks_match_hidden_states(stories, c4_text):
    model, tok = stories
    windows = token_rows(tok, c4_text, 2, 16)
    nhooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    res = collect_outliers(model, windows, topk=3, progress=False)
    # every hook is removed afterwards
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == nhooks
    with torch.no_grad():
        hs = [model(input_ids=w[None], output_hidden_states=True).hidden_states for w in windows]
    nlayers = model.config.num_hidden_layers
    # hidden_states[i] for i < L are the embedding output and layer outputs (the last one is after the norm)
    for i in range(nlayers):
        a = torch.stack([h[i][0] for h in hs]).abs()  # [windows, tokens, hidden]
        r = res["residual"][i]
        assert r["max_abs"] == pytest.approx(a.max().item(), rel=1e-5)
        assert [c["channel"] for c in r["top_channels"]] == a.amax((0, 1)).topk(3).indices.tolist()
        t = r["top_tokens"][0]
        assert a[t["window"], t["position"]].max().item() == pytest.approx(t["max_abs"], rel=1e-5)
        assert t["token_id"] == windows[t["window"], t["position"]].item()
    assert res["first_window_abs"].shape == (nlayers + 1, 16, model.config.hidden_size)
    assert set(res["linear_inputs"][0]) == {"layer", *ROLES}
    assert all(res["linear_inputs"][i][r] > 0 for i in range(nlayers) for r in ROLES)


def test_rotation_spreads_the_massive_channel(smollm2, c4_text):
    """--rotate: R1 spreads channel 507's spike over every channel of its token (max falls ~sqrt(576)×); the
    recorded down_proj input is what the Linear multiplies, after the online Hadamard (R4): 3k+ before."""
    from osp_eval.apply import quantize_
    from osp_eval.config import preset

    model, tok = smollm2
    windows = token_rows(tok, c4_text, 1, 32)
    before = max(collect_outliers(model, windows, progress=False)["residual"], key=lambda r: r["max_abs"])
    quantize_(model, preset("osp", rotate=True), progress=False)
    res = collect_outliers(model, windows, progress=False)
    after = max(res["residual"], key=lambda r: r["max_abs"])
    assert after["max_abs"] < before["max_abs"] / 5, (before["max_abs"], after["max_abs"])
    assert after["top_channels"][0]["channel"] != 507
    assert after["top_tokens"][0]["position"] == 0  # still the same token: rotation mixes channels, not tokens
    assert max(r["down"] for r in res["linear_inputs"]) < 500


def _cli(argv: list[str]):
    p = argparse.ArgumentParser(prog="osp-eval")
    add_cli(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    args.func(args)


def test_cli_stories(stories_path, data_dir, tmp_path, capsys):
    _cli(["outliers", stories_path, "--nwindows", "2", "--ntokens", "32", "--layer", "3", "--data_dir", data_dir,
          "--output_dir", str(tmp_path), "--device", "cpu", "--no_progress"])
    printed = capsys.readouterr().out
    files = list((tmp_path / "outliers" / "stories260K").glob("*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    assert rec["kind"] == "outliers" and rec["layer"] == 3 and rec["method"] == "fp"
    assert len(rec["residual"]) == 6 and len(rec["linear_inputs"]) == 5
    assert isinstance(rec["residual"][2]["top_tokens"][0]["token"], str)
    assert "versions" in rec and "config" in rec
    pngs = sorted(tmp_path.glob("outliers/stories260K/*.png"))
    assert [p.name for p in pngs] == sorted(p.split("/")[-1] for p in rec["plots"])
    assert len(pngs) == 2 and all(_is_png(p) for p in pngs)
    assert any(p.name.endswith("_layer3.png") for p in pngs)
    assert "largest residual |x|" in printed and "layer 5 output" in printed


def test_cli_bad_layer(stories_path, data_dir, tmp_path):
    with pytest.raises(OspEvalError, match="--layer 9: this model has residual indices 0 .embeddings. to 5"):
        _cli(["outliers", stories_path, "--nwindows", "1", "--ntokens", "8", "--layer", "9", "--data_dir",
              data_dir, "--output_dir", str(tmp_path), "--device", "cpu", "--no_progress"])


def test_cli_too_many_tokens(stories_path, data_dir, tmp_path):
    with pytest.raises(OspEvalError, match="max_position_embeddings"):
        _cli(["outliers", stories_path, "--ntokens", "1024", "--data_dir", data_dir, "--output_dir", str(tmp_path),
              "--device", "cpu", "--no_progress"])
