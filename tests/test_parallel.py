"""Several devices, tested on the CPU: the pipeline-sharding plan and device_map (osp_eval.sharding), and data
parallelism (osp_eval.parallel) in 2 gloo processes, down to lighteval giving one process's exact numbers."""

from __future__ import annotations

import glob
import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from osp_eval import parallel
from osp_eval.errors import OspEvalError
from osp_eval.sharding import GIB, device_map, model_bytes, place, shard_plan

# ---------------------------------------------------------------- shard_plan


def best_max_load(items, caps):
    """Brute force: the smallest possible largest device load over every contiguous split that fits."""
    n, best = len(items), None
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(caps) - 1):
        bounds = (0, *cuts, n)
        loads = [sum(items[a:b]) for a, b in zip(bounds, bounds[1:])]
        if all(load <= cap for load, cap in zip(loads, caps)):
            best = max(loads) if best is None else min(best, max(loads))
    return best


def check_plan(plan, layer_bytes, caps, first, last):
    assert [i for run in plan for i in run] == list(range(len(layer_bytes)))  # every layer once, in order
    assert all(run == list(range(run[0], run[-1] + 1)) for run in plan if run)  # contiguous
    items = list(layer_bytes)
    items[0] += first
    items[-1] += last
    loads = [sum(items[i] for i in run) for run in plan]
    assert all(load <= cap for load, cap in zip(loads, caps))
    return max(loads)


def test_shard_plan_balanced_on_hand_made_sizes():
    plan = shard_plan([10] * 8, [100, 100], first_extra=5, last_extra=5)
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # a big embedding pushes layers to the next device; the head's bytes ride with the last layer
    plan = shard_plan([10] * 8, [100] * 4, first_extra=30, last_extra=0)
    assert plan[0] == [0] and check_plan(plan, [10] * 8, [100] * 4, 30, 0) == 40  # the least largest load
    # capacity binds before balance: the small first device takes only what fits
    plan = shard_plan([10] * 8, [25, 100], first_extra=5)
    assert plan == [[0, 1], [2, 3, 4, 5, 6, 7]]
    # more devices than needed: the balance uses them all, never splitting a layer
    assert shard_plan([7, 7, 7], [100] * 5) == [[0], [1], [2], [], []]


def test_shard_plan_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n, d = rng.randint(1, 7), rng.randint(1, 4)
        layer_bytes = [rng.randint(1, 20) for _ in range(n)]
        first, last = rng.randint(0, 15), rng.randint(0, 15)
        caps = [rng.randint(10, 60) for _ in range(d)]
        items = list(layer_bytes)
        items[0] += first
        items[-1] += last
        best = best_max_load(items, caps)
        if best is None:
            with pytest.raises(OspEvalError):
                shard_plan(layer_bytes, caps, first, last)
            continue
        plan = shard_plan(layer_bytes, caps, first, last)
        assert len(plan) == d and check_plan(plan, layer_bytes, caps, first, last) == best


def test_shard_plan_error_is_one_line_with_the_numbers():
    with pytest.raises(OspEvalError) as e:
        shard_plan([4 * GIB] * 10, [20 * GIB, 15 * GIB], first_extra=GIB, last_extra=GIB)
    msg = str(e.value)
    assert "\n" not in msg and "42.00 GiB" in msg and "20.00 + 15.00 GiB" in msg and "--dtype" in msg


# ---------------------------------------------------------------- device_map


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def owner(dmap, name):
    """accelerate's rule: the longest device_map entry that is the tensor's module or a parent of it."""
    hits = [k for k in dmap if name == k or name.startswith(k + ".")]
    assert hits, f"{name} is not placed"
    return dmap[max(hits, key=len)]


@pytest.mark.parametrize("tied", [False, True])
def test_device_map_covers_every_tensor(tied):
    model = tiny_llama(tied)
    plan = [[0], [1, 2], [3]]
    dmap = device_map(model, plan, ["cuda:0", "cuda:1", "cuda:2"])
    for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        dev = owner(dmap, name)
        if name.startswith("model.layers."):
            assert dev == {0: "cuda:0", 1: "cuda:1", 2: "cuda:1", 3: "cuda:2"}[int(name.split(".")[2])], name
        elif name.startswith("model.norm"):
            assert dev == "cuda:2"
        elif name.startswith("lm_head"):
            assert dev == ("cuda:0" if tied else "cuda:2")  # a tied head stays with its embedding
        else:
            assert dev == "cuda:0", name  # embedding, rotary tables
    layers, first, last = model_bytes(model)
    every = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    assert sum(layers) + first + last == sum(t.numel() * t.element_size() for t in every)


def test_place_keeps_the_outputs():
    model = tiny_llama(False)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
        layout = place(model, ["cpu", "cpu"], capacities=[10**9, 10**9])
        got = model(ids).logits
    assert torch.equal(want, got)
    assert layout["layers"] == [[0, 1], [2, 3]]  # equal layers, embedding and untied head of equal size


# ---------------------------------------------------------------- data parallel (2 gloo processes)


def _collectives(out_dir):
    w = parallel.world()
    mine = parallel.shard(10)
    merged = parallel.gather({i: i * i for i in mine}, agree="same work")
    torch.manual_seed(w.rank)  # different weights per rank until rank 0's are broadcast
    lin = torch.nn.Linear(3, 2)
    differed = parallel.broadcast_model(lin)
    try:
        parallel.gather({}, agree=w.rank)
        disagreement = None
    except OspEvalError as e:
        disagreement = str(e)
    Path(out_dir, f"{w.rank}.json").write_text(json.dumps({
        "world": [w.rank, w.size, w.backend], "mine": mine, "merged": sorted(merged.items()),
        "weight": lin.weight.tolist(), "differed": differed, "disagreement": disagreement,
        "layout": parallel.layout("cpu")}))


def test_shard_gather_broadcast_in_two_processes(tmp_path):
    parallel.launch(_collectives, 2, str(tmp_path), backend="gloo")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == [0, 2, "gloo"] and r1["world"] == [1, 2, "gloo"]
    assert r0["mine"] == [0, 2, 4, 6, 8] and r1["mine"] == [1, 3, 5, 7, 9]
    assert r0["merged"] == r1["merged"] == [[i, i * i] for i in range(10)]
    torch.manual_seed(0)
    assert r0["weight"] == r1["weight"] == torch.nn.Linear(3, 2).weight.tolist()
    assert (r0["differed"], r1["differed"]) == (0, 2)
    assert "disagree" in r0["disagreement"] and "disagree" in r1["disagreement"]
    assert r0["layout"] == {"world_size": 2, "backend": "gloo", "devices": ["cpu", "cpu"]}
    assert parallel.world().size == 1  # the test process itself stays a world of one


LIGHTEVAL = dict(tasks="arc:easy|0,trivia_qa|5", max_samples=4, batch_size=1, gen_batch_size=2, max_length=128,
                 save_details=True, progress=False)  # batch_size 1 x 128 tokens: several batches to share


def _lighteval(model, data_dir, out_dir):
    from osp_eval.config import QuantConfig
    from osp_eval.lighteval_run import run_lighteval

    run_lighteval(model, QuantConfig(w_bits=4, w_method="rtn"), data_dir=data_dir, output_dir=out_dir, **LIGHTEVAL)


def _per_doc(record):
    import pandas as pd

    out = {}
    for task in record["tasks"]:
        files = glob.glob(f"{record['lighteval_output']}/details/*/*/details_{task}|*.parquet")
        assert len(files) == 1, files
        d = pd.read_parquet(files[0])
        out[task] = [(doc["query"], [float(x) for x in r["logprobs"]], list(r["text"]))
                     for doc, r in zip(d["doc"], d["model_response"])]
    return out


def test_data_parallel_lighteval_equals_one_process(stories_path, data_dir, tmp_path):
    pytest.importorskip("lighteval")
    _lighteval(stories_path, data_dir, str(tmp_path / "one"))
    parallel.launch(_lighteval, 2, stories_path, data_dir, str(tmp_path / "two"), backend="gloo")
    (one,), (two,) = (glob.glob(str(tmp_path / k / "lighteval" / "*" / "*.json")) for k in ("one", "two"))
    one, two = json.loads(Path(one).read_text()), json.loads(Path(two).read_text())
    assert one["parallel"]["world_size"] == 1 and two["parallel"] == {
        "world_size": 2, "backend": "gloo", "devices": ["cpu", "cpu"], "tensors_replaced_by_rank0": 0}
    assert one["identity"] == two["identity"]  # the layout is recorded, not part of what the result is
    assert {n: t["value"] for n, t in one["tasks"].items()} == {n: t["value"] for n, t in two["tasks"].items()}
    a, b = _per_doc(one), _per_doc(two)
    assert a == b
    assert len(a["arc:easy"]) == 4 and all(len(lp) == 4 for _, lp, _ in a["arc:easy"])
    assert len(a["trivia_qa"]) == 4 and any(t[0] for _, _, t in a["trivia_qa"])  # it generated text


def _fail_on_rank1():
    if parallel.world().rank == 1:
        raise OspEvalError("rank 1 cannot go on")


def test_a_failing_process_is_one_error_line():
    with pytest.raises(OspEvalError, match=r"^a data-parallel process failed: rank 1 cannot go on$"):
        parallel.launch(_fail_on_rank1, 2, backend="gloo")


def test_cli_data_parallel_spawns_and_prints_once(stories_path, data_dir, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, str(root / "lighteval_ptq.py"), stories_path, "--data_dir", data_dir, "--tasks",
            "arc:easy|0", "--max_samples", "2", "--max_length", "128", "--output_dir", str(tmp_path), "--no_progress"]
    r = subprocess.run([*argv, "--data_parallel", "2", "--devices", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "do not combine" in r.stderr, r.stderr
    r = subprocess.run([*argv, "--data_parallel", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("summary: ") == 1  # rank 0 alone prints and writes
    (summary,) = glob.glob(str(tmp_path / "lighteval" / "*" / "*.json"))
    assert json.loads(Path(summary).read_text())["parallel"]["world_size"] == 2


def _vllm_in_two(model):
    from osp_eval.config import QuantConfig
    from osp_eval.lighteval_run import run_lighteval

    run_lighteval(model, QuantConfig(), backend="vllm")


def test_vllm_backend_is_refused_with_data_parallelism(stories_path):
    with pytest.raises(OspEvalError, match="vLLM backend is not supported yet: use --backend hf$"):
        parallel.launch(_vllm_in_two, 2, stories_path, backend="gloo")
