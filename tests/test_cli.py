"""Bad input from the command line: one line on stderr, non-zero exit, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def osp_eval(*args, env_data=None):
    return subprocess.run([sys.executable, "-m", "osp_eval", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def assert_clean_error(r, *needles):
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert err and err[-1].startswith("osp-eval: error:"), r.stderr
    for n in needles:
        assert n in err[-1], err[-1]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return d


@pytest.mark.parametrize(
    "args,needles",
    [
        (["ppl", "/nonexistent/model", "--w_bits", "4"], ["not found"]),
        (["ppl", "STORIES", "--w_bits", "9", "--w_rtn"], ["--w_bits 9", "2..8"]),
        (["ppl", "STORIES", "--a_bits", "1"], ["--a_bits 1"]),
        (["ppl", "STORIES", "--w_bits", "4", "--w_rtn", "--w_groupsize", "48", "--seqlen", "256"], ["48", "divide"]),
        (["ppl", "STORIES", "--seqlen", "2048"], ["max_position_embeddings", "512"]),
        (["ppl", "STORIES", "--rotate", "--rotate_down_proj", "--seqlen", "256"], ["--rotate"]),
        (["ppl", "STORIES", "--kv_bits", "4", "--k_groupsize", "4", "--seqlen", "256"], ["k_groupsize"]),
        (["ppl", "GPT2", "--seqlen", "256"], ["unsupported architecture", "LlamaForCausalLM"]),
    ],
)
def test_bad_input_is_one_clean_line(args, needles, stories_path, gpt2_dir, data_dir):
    args = [{"STORIES": stories_path, "GPT2": gpt2_dir}.get(a, a) for a in args]
    assert_clean_error(osp_eval(*args, "--data_dir", data_dir, "--max_windows", "1"), *needles)


def test_missing_data_offline_says_where(stories_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "osp_eval", "ppl", stories_path, "--seqlen", "256"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                            "HOME": str(tmp_path)})
    assert_clean_error(r, "--data_dir")


def test_script_1_prints_a_finite_ppl(stories_path, tmp_path):
    r = subprocess.run(["bash", "scripts/1_eval_ppl_rtn.sh", stories_path, "4", "4", "4", "--seqlen", "256",
                        "--max_windows", "2", "--output_dir", tmp_path, "--no_progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if "wikitext2 ppl" in l][0]
    assert "rtn W4A4KV4" in line
    ppl = float(line.split("ppl = ")[1].split()[0])
    assert 1 < ppl < 1e4
    rec = json.loads(next((tmp_path / "ppl" / "stories260K").glob("rtn_w4a4kv4_*.json")).read_text())
    assert rec["config"]["w_bits"] == 4 and rec["config"]["k_bits"] == 4 and rec["ppl"] == pytest.approx(ppl, 1e-3)
    assert "torch" in rec["versions"] and rec["device"]


def test_gptq_offline_without_wikitext_train_names_c4(stories_path, data_dir):
    r = osp_eval("ppl", stories_path, "--w_bits", "4", "--seqlen", "256", "--data_dir", data_dir)
    assert_clean_error(r, "--calib_data c4")


@pytest.mark.parametrize(
    "args,needles",
    [
        (["ppl", "STORIES", "--kernels", "cuda"], ["--kernels", "reference"]),
        (["ppl", "STORIES", "--offload", "sometimes"], ["--offload", "auto"]),
        (["ppl", "STORIES", "--devices", "0"], ["--devices"]),
        (["ppl", "STORIES", "--devices", "2", "--seqlen", "256"], ["--devices 2", "CUDA device"]),
        (["table", "STORIES", "--offload", "sometimes"], ["--offload"]),
        (["kurtosis", "STORIES", "--offload", "sometimes"], ["--offload"]),
        (["lighteval", "STORIES", "--data_parallel", "0"], ["--data_parallel"]),
        (["ppl", "STORIES", "--compile", "--cuda_graphs"], ["--compile", "--cuda_graphs"]),
        (["ppl", "STORIES", "--compile", "--backend", "vllm"], ["--compile", "--backend hf"]),
        (["table", "STORIES", "--kernels", "fastest"], ["--kernels", "fast"]),
    ],
)
def test_new_flags_bad_input_is_one_line_exit_2(args, needles, stories_path, data_dir):
    args = [stories_path if a == "STORIES" else a for a in args]
    r = osp_eval(*args, "--data_dir", data_dir)
    assert_clean_error(r, *needles)
    assert r.returncode == 2


def test_kernels_triton_without_a_gpu_is_one_line_exit_2(stories_path, data_dir):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tests' interpreter would run it
    r = subprocess.run([sys.executable, "-m", "osp_eval", "ppl", stories_path, "--w_bits", "4", "--w_rtn",
                        "--kernels", "triton", "--seqlen", "256", "--data_dir", data_dir], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert_clean_error(r, "--kernels triton", "CUDA")
    assert r.returncode == 2
