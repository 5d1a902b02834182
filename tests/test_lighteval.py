"""The OSP benchmarks through the real lighteval pipeline, end to end on stories260K with the local data.

Frugal on purpose (2 shared CPU cores): two docs per task, one full FP run over the eleven tasks, one W2
run over two tasks; everything else reuses them or fails before a model loads.
"""

from __future__ import annotations

import glob
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lighteval")

from osp_eval.config import QuantConfig  # noqa: E402
from osp_eval.errors import OspEvalError  # noqa: E402
from osp_eval.lighteval_run import REPO_TASKS, parse_tasks, run_lighteval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 2  # docs per task


def details(record: dict, task: str):
    """lighteval's per-sample details of one task (a pandas frame)."""
    import pandas as pd

    files = glob.glob(f"{record['lighteval_output']}/details/*/*/details_{task}|*.parquet")
    assert len(files) == 1, files
    return pd.read_parquet(files[0])


@pytest.fixture(scope="module")
def fp_run(stories_path, data_dir, tmp_path_factory):
    return run_lighteval(stories_path, QuantConfig(), tasks=str(REPO_TASKS), data_dir=data_dir, max_samples=N,
                         batch_size=8, output_dir=str(tmp_path_factory.mktemp("fp")), save_details=True,
                         progress=False)


@pytest.fixture(scope="module")
def w2_run(stories_path, data_dir, tmp_path_factory):
    cfg = QuantConfig(w_bits=2, w_method="rtn")
    return run_lighteval(stories_path, cfg, tasks="arc:easy|0,piqa|0", data_dir=data_dir, max_samples=N,
                         batch_size=8, output_dir=str(tmp_path_factory.mktemp("w2")), save_details=True,
                         progress=False)


def test_tasks_file_is_the_reference_eleven():
    lines = [s for s in REPO_TASKS.read_text().split("\n") if s]
    assert len(lines) == 11 and all(s.startswith("custom|") and s.endswith("|1") for s in lines)
    assert dict(parse_tasks(str(REPO_TASKS))) == {
        "arc:easy": 0, "arc:challenge": 0, "commonsense_qa": 0, "gsm8k": 8, "hellaswag": 0, "mmlu": 0,
        "openbook_qa": 0, "piqa": 0, "siqa": 0, "trivia_qa": 5, "winogrande": 0}


def test_every_task_runs_with_local_data(fp_run):
    tasks = fp_run["tasks"]
    assert set(tasks) == {n for n, _ in parse_tasks(str(REPO_TASKS))} and not fp_run["skipped"]
    for name, t in tasks.items():
        assert t["value"] is not None and 0.0 <= t["value"] <= 1.0, (name, t)
        assert t["n_samples"] == N and t["data"] == "local"
    # the generative tasks really generated
    for task in ("gsm8k", "trivia_qa"):
        d = details(fp_run, task)
        assert len(d) == N and all(len(r["text"]) == 1 for r in d["model_response"])
    assert details(fp_run, "trivia_qa")["model_response"].map(lambda r: len(r["output_tokens"][0])).max() > 1
    # inexact local data is flagged and kept out of `average`, but shown in `average_all`
    assert {n for n, t in tasks.items() if t["not_exact"]} == {"hellaswag", "trivia_qa", "openbook_qa"}
    assert set(fp_run["average_over"]) == {"arc", "commonsense_qa", "gsm8k", "mmlu", "piqa", "siqa", "winogrande"}
    assert len(fp_run["benchmarks"]) == 10 and not fp_run["average_is_the_ten"]
    arc = (tasks["arc:easy"]["value"] + tasks["arc:challenge"]["value"]) / 2
    assert math.isclose(fp_run["benchmarks"]["arc"]["value"], arc)
    exact = [b["value"] for b in fp_run["benchmarks"].values() if not b["not_exact"]]
    assert math.isclose(fp_run["average"], sum(exact) / len(exact))
    assert Path(fp_run["result_path"]).is_file()
    assert glob.glob(f"{fp_run['lighteval_output']}/results/*/results_*.json")


def test_quantized_model_is_the_one_evaluated(fp_run, w2_run):
    # Same docs, same lighteval model config (model_name is the model's slug in both runs), so a shared
    # sample cache would hand W2 the FP log-likelihoods; the fresh cache per evaluation must not.
    for task in ("arc:easy", "piqa"):
        fp, w2 = details(fp_run, task), details(w2_run, task)
        assert list(fp["doc"].map(lambda d: d["query"])) == list(w2["doc"].map(lambda d: d["query"]))
        lp_fp = [list(r["logprobs"]) for r in fp["model_response"]]
        lp_w2 = [list(r["logprobs"]) for r in w2["model_response"]]
        assert lp_fp != lp_w2
        for a, b in zip(lp_fp, lp_w2):
            assert max(abs(x - y) for x, y in zip(a, b)) > 1e-3
    assert w2_run["config"]["w_bits"] == 2 and w2_run["method"] == "rtn"


def test_loglikelihoods_equal_direct_transformers(fp_run, stories):
    """Independent check: per-choice log-likelihoods of the harness = a plain forward of the same
    prompt+continuation tokens, and those tokens = our own tokenization of the prompt and the choice."""
    model, tok = stories
    d = details(fp_run, "arc:easy")
    for doc, resp, metric in zip(d["doc"], d["model_response"], d["metric"]):
        ctx = [int(x) for x in resp["input_tokens"]]
        prompt = doc["query"]  # 0-shot, no instruction: the prompt is the query
        assert ctx == tok.encode(prompt)
        scores = []
        for j, choice in enumerate(doc["choices"]):
            cont = [int(x) for x in resp["output_tokens"][j]]
            assert ctx + cont == tok.encode(prompt + choice)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            direct = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
            assert resp["logprobs"][j] == pytest.approx(direct, abs=1e-4)
            scores.append(direct / (len(choice) - 1 if choice.startswith(" ") else len(choice)))
        best = max(range(len(scores)), key=scores.__getitem__)
        assert metric["acc_norm_nospace"] == float(best == int(doc["gold_index"]))


def test_unknown_task_and_missing_tasks_file(tmp_path):
    with pytest.raises(OspEvalError, match="unknown task 'nope'"):
        parse_tasks("arc:easy|0,nope|0")
    bad = tmp_path / "tasks.txt"
    bad.write_text("custom|arc:easy|0|1\ncustom|hellaswagg|0|1\n")
    with pytest.raises(OspEvalError, match="unknown task 'hellaswagg'"):
        parse_tasks(str(bad))
    with pytest.raises(OspEvalError, match="--tasks file not found"):
        parse_tasks(str(tmp_path / "missing.txt"))
    with pytest.raises(OspEvalError, match="few-shot count"):
        parse_tasks("arc:easy|x")


def test_cli_errors_are_one_line(tmp_path, stories_path, data_dir):
    r = subprocess.run([sys.executable, str(ROOT / "lighteval_ptq.py"), stories_path, "--data_dir", data_dir,
                        "--tasks", str(tmp_path / "nope.txt")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--tasks file not found" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "lighteval_ptq.py"), stories_path, "--data_dir", data_dir,
                        "--loglik_backend", "vllm"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "needs the vLLM path" in r.stderr, r.stderr


def test_missing_local_data_is_a_listed_skip(tmp_path, stories_path, data_dir):
    partial = tmp_path / "data"
    partial.mkdir()
    (partial / "ai2_arc").symlink_to(Path(data_dir) / "ai2_arc")
    with pytest.raises(OspEvalError, match="no task left to run.*siqa/dev.jsonl"):
        run_lighteval(stories_path, QuantConfig(), tasks="siqa|0", data_dir=str(partial), max_samples=N,
                      output_dir=str(tmp_path / "out"), progress=False)
    r = run_lighteval(stories_path, QuantConfig(), tasks="arc:easy|0,siqa|0", data_dir=str(partial),
                      max_samples=N, batch_size=8, output_dir=str(tmp_path / "out"), progress=False)
    assert list(r["tasks"]) == ["arc:easy"] and "siqa/dev.jsonl" in r["skipped"]["siqa"]
    assert r["average"] is None and r["benchmarks"]["arc"]["not_exact"]  # one ARC set is not the benchmark


def test_osp_eval_subcommand_has_the_same_flags():
    import argparse

    from osp_eval.lighteval_cli import add_cli, build_parser

    p = argparse.ArgumentParser(prog="osp-eval")
    add_cli(p.add_subparsers(dest="cmd"))
    argv = ["m", "--w_bits", "4", "--a_bits", "4", "--kv_bits", "4", "--rotate_down_proj", "--no_rtn",
            "--tasks", "t.txt", "--max_samples", "3", "--batch_size", "5", "--output_dir", "o", "--save_details"]
    sub, direct = vars(p.parse_args(["lighteval", *argv])), vars(build_parser().parse_args(argv))
    sub.pop("cmd")
    assert sub.keys() == direct.keys() and all(sub[k] == direct[k] for k in sub if k != "func")
    assert direct["no_rtn"] and direct["kv_bits"] == 4 and direct["max_samples"] == 3


def test_gen_batch_size_sets_the_generation_batch(stories_path, data_dir, tmp_path, monkeypatch):
    """--gen_batch_size reaches lighteval's generate loop (and only it: log-likelihoods keep --batch_size)."""
    from lighteval.models.transformers.transformers_model import TransformersModel

    seen, real = [], TransformersModel._get_batch_size
    monkeypatch.setattr(TransformersModel, "_get_batch_size",
                        lambda self, max_input_length, override_bs, **kw: seen.append(override_bs) or
                        real(self, max_input_length, override_bs, **kw))
    r = run_lighteval(stories_path, QuantConfig(), tasks="trivia_qa|5,arc:easy|0", data_dir=data_dir, max_samples=4,
                      batch_size=8, gen_batch_size=2, output_dir=str(tmp_path), progress=False)
    assert seen and set(seen) == {2}
    assert r["gen_batch_size"] == 2 and r["batch_size"] == 8
    with pytest.raises(OspEvalError, match="gen_batch_size"):
        run_lighteval(stories_path, QuantConfig(), tasks="arc:easy|0", data_dir=data_dir, gen_batch_size=0,
                      output_dir=str(tmp_path), progress=False)


def test_hub_route_requests_the_pinned_datasets(stories_path, data_dir, tmp_path, monkeypatch):
    """Without --data_dir (online), every task loads its pinned hub repo, subset and revision through lighteval.
    No network here: `load_dataset` is intercepted, records the request and serves the same rows from the
    local copy, so the run completes through the real pipeline."""
    import lighteval.tasks.lighteval_task as ltask

    from osp_eval import lighteval_data, lighteval_run
    from osp_eval import lighteval_tasks as lt

    monkeypatch.delenv("OSP_EVAL_DATA", raising=False)
    monkeypatch.setattr(lighteval_run, "_offline", lambda: False)
    requests, real = [], ltask.load_dataset

    def fake_hub(path, name=None, revision=None, **kw):
        requests.append((path, name, revision))
        task = next(n for n, c in lt.TASKS.items() if (c.hf_repo, c.hf_subset) == (path, name))
        local = lighteval_data.local_configs([task], Path(data_dir), False)[0][0]
        return real(path=local.hf_repo, name=local.hf_subset)

    monkeypatch.setattr(ltask, "load_dataset", fake_hub)
    r = run_lighteval(stories_path, QuantConfig(), tasks="arc:easy|0,piqa|0", data_dir=None, max_samples=2,
                      batch_size=8, output_dir=str(tmp_path), progress=False)
    want = {(lt.TASKS[n].hf_repo, lt.TASKS[n].hf_subset, lt.TASKS[n].hf_revision) for n in ("arc:easy", "piqa")}
    assert set(requests) == want and all(rev for _, _, rev in requests)  # pinned revisions, never "latest"
    for n in ("arc:easy", "piqa"):
        t = r["tasks"][n]
        assert t["data"] == "hub" and t["revision"] == lt.TASKS[n].hf_revision and 0 <= t["value"] <= 1
