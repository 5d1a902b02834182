"""The grid runner: table, CSV and PNG; a rerun computes nothing; a deleted cell alone is recomputed."""

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(stories_path, data_dir, out):
    r = subprocess.run([sys.executable, "-m", "osp_eval", "table", stories_path, "--bits", "4-4-4", "--bits", "8-8-8",
                        "--methods", "rtn,ffn_had", "--seqlen", "128", "--max_windows", "1", "--data_dir", data_dir,
                        "--output_dir", str(out), "--no_progress"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "table" / "summary.json").read_text())


def test_grid_caches_and_resumes(stories_path, data_dir, tmp_path):
    s = _table(stories_path, data_dir, tmp_path)
    assert s["cells"] == 4 and s["computed"] == 4 and not s["failed"]
    md = (tmp_path / "table" / "table.md").read_text()
    assert "| RTN |" in md and "| + FFN Had |" in md and "stories260K" in md
    rows = list(csv.DictReader(open(tmp_path / "table" / "table.csv")))
    assert len(rows) == 4 and all(float(r["ppl"]) > 1 for r in rows)
    assert all(float(r["host_peak_rss_gb"]) > 0 and r["streamed"] == "False" for r in rows)  # peak memory columns
    assert "# Peak memory" in md and json.loads(Path(rows[0]["result"]).read_text())["peak_memory"]
    assert (tmp_path / "table" / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rerun: nothing new
    assert _table(stories_path, data_dir, tmp_path)["computed"] == 0
    # delete one cell: only it is recomputed, to the same value
    victim = Path(rows[1]["result"])
    victim.unlink()
    s3 = _table(stories_path, data_dir, tmp_path)
    assert s3["computed"] == 1
    rows3 = list(csv.DictReader(open(tmp_path / "table" / "table.csv")))
    assert rows3[1]["ppl"] == rows[1]["ppl"]


def test_spinquant_row_trains_once_and_caches(stories_path, data_dir, tmp_path):
    args = [sys.executable, "-m", "osp_eval", "table", stories_path, "--bits", "4-4-4", "--methods", "spinquant",
            "--calib_data", "c4", "--nsamples", "8", "--calib_seqlen", "128", "--seqlen", "128", "--max_windows", "1",
            "--spinquant_steps", "2", "--spinquant_nsamples", "8", "--spinquant_seqlen", "64", "--data_dir", data_dir,
            "--output_dir", str(tmp_path), "--no_progress"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "table" / "summary.json").read_text())
    assert s["computed"] == 1 and not s["failed"]
    rot = list((tmp_path / "rotations").rglob("R_*.bin"))
    assert len(rot) == 1
    rec = json.loads(Path(list(csv.DictReader(open(tmp_path / "table" / "table.csv")))[0]["result"]).read_text())
    assert rec["config"]["optimized_rotation_path"] == str(rot[0]) and rec["method"] == "spinquant"
    subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    assert json.loads((tmp_path / "table" / "summary.json").read_text())["computed"] == 0


def test_grid_with_lighteval_reuses_gptq_and_caches(stories_path, data_dir, tmp_path):
    """--tasks adds a lighteval average per cell; the GPTQ cell's lighteval run loads the PPL run's weights
    (no second GPTQ); a rerun computes nothing."""
    args = [sys.executable, "-m", "osp_eval", "table", stories_path, "--bits", "4-16-16", "--methods", "rtn,gptq",
            "--calib_data", "c4", "--nsamples", "4", "--calib_seqlen", "64", "--seqlen", "128", "--max_windows", "1",
            "--tasks", "arc:easy|0,piqa|0", "--max_samples", "3", "--data_dir", data_dir,
            "--output_dir", str(tmp_path), "--no_progress"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "table" / "summary.json").read_text())
    assert s["computed"] == 2 and s["lighteval_computed"] == 2 and not s["failed"]
    rows = list(csv.DictReader(open(tmp_path / "table" / "table.csv")))
    assert all(0 <= float(r["lighteval_average"]) <= 1 for r in rows)
    gptq = json.loads(Path(next(r for r in rows if r["method"] == "gptq")["lighteval_result"]).read_text())
    assert gptq["loaded_from"].endswith(".pt") and gptq["method"] == "gptq"
    assert "# Lighteval benchmarks" in (tmp_path / "table" / "table.md").read_text()
    subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    s2 = json.loads((tmp_path / "table" / "summary.json").read_text())
    assert s2["computed"] == 0 and s2["lighteval_computed"] == 0
