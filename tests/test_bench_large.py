"""benchmarks/bench_large.py: argument checks and a tiny CPU dry run of both parts (streamed == in-GPU path)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_large  # noqa: E402


def test_arguments():
    a = bench_large.parse_args(["--part", "70b", "--layers", "6", "--tiny"])
    assert a.part == "70b" and a.layers == 6 and a.seqlen == 32 and a.nwindows == 3
    with pytest.raises(SystemExit):
        bench_large.parse_args(["--models", "llama3-70b"])
    with pytest.raises(SystemExit):
        bench_large.parse_args(["--rows", "rtn,awq"])
    c = bench_large.make_config("llama3-8b", tiny=False)
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == (4096, 32, 8, 128256)
    assert c.rope_parameters["rope_type"] == "llama3"
    q = bench_large.make_config("qwen2.5-7b", tiny=False)
    assert (q.hidden_size, q.intermediate_size, q.num_attention_heads, q.num_key_value_heads) == (3584, 18944, 28, 4)
    assert bench_large.make_config("llama3-70b", tiny=False, layers=3).num_hidden_layers == 3


def test_tiny_dry_run(tmp_path, data_dir):
    r = bench_large.main(["--tiny", "--models", "qwen2.5-7b", "--rows", "gptq,quarot", "--offload", "both",
                          "--data_dir", data_dir, "--out", str(tmp_path)])
    assert r["complete"] and "UTF-8 bytes" in r["eval_data"] and (tmp_path / "bench_large_8b_tiny.json").is_file()
    rows = r["rows"]
    assert len(rows) == 4 and not any("error" in x for x in rows)
    for a, b in zip(rows[::2], rows[1::2]):  # in-GPU then streamed, per row
        assert not a["streamed"] and b["streamed"] and a["nlls"] == b["nlls"]
    r = bench_large.main(["--tiny", "--models", "llama3-8b", "--rows", "spinquant", "--spinquant_steps", "2",
                          "--recompute_rotations", "--micro_batch_size", "4", "--out", str(tmp_path)])
    sq = r["rows"][0]
    assert "error" not in sq and sq["spinquant"]["steps"] == 2 and sq["spinquant"]["seconds_per_step"] > 0
    r = bench_large.main(["--tiny", "--models", "llama3-8b", "--rows", "kurtosis", "--offload", "both",
                          "--kurtosis_rows", "4", "--out", str(tmp_path)])
    k_in, k_stream = r["rows"]
    assert k_in["kurtosis_rows"] == 4 and k_in["kurtosis"] == k_stream["kurtosis"]  # streamed == in-GPU
    r = bench_large.main(["--tiny", "--part", "70b", "--layers", "2"])
    assert r["70b"]["fp_streamed_equals_in_gpu"] and r["70b"]["gptq_streamed_equals_in_gpu"]
    assert r["70b"]["gptq_gptq_projected_80_layers_seconds"] > 0


def test_spinquant_training_spread_over_commands(tmp_path):
    """--spinquant_max_seconds 0 stops after one step (the row is not evaluated); the same command again continues
    from --spinquant_state and gives the losses of one uninterrupted run."""
    args = ["--tiny", "--models", "llama3-8b", "--rows", "spinquant", "--spinquant_steps", "3"]
    whole = bench_large.main(args + ["--out", str(tmp_path / "a")])["rows"][0]
    state = ["--spinquant_state", str(tmp_path / "s"), "--out", str(tmp_path / "b")]
    first = bench_large.main(args + state + ["--spinquant_max_seconds", "0"])["rows"][0]
    assert "not evaluated" in first["error"] and first["spinquant"]["steps_done"] == 1
    second = bench_large.main(args + state)["rows"][0]
    assert "error" not in second and second["spinquant"]["complete"]
    assert len(second["spinquant"]["segment_seconds"]) == 2
    assert second["spinquant"]["losses"] == whole["spinquant"]["losses"] and second["nlls"] == whole["nlls"]
