"""Quantize a model in memory and run the reference's benchmarks
through the real lighteval 0.13 pipeline.

Glue and shims (each narrow, each explained where it lives):
- the in-memory model goes in through `TransformersModel.from_model`, subclassed to load our tokenizer
  (GGUF included) and to score log-likelihoods in length-sorted batches (`lighteval_model.OspLightevalModel`);
- a fresh `cache_dir` per evaluation: lighteval's SampleCache keys outputs on the model *config*, so a
  second quantized model with the same config would get the first one's answers;
- the task registry sees only our tasks (`_only_our_tasks`);
- xxhash >= 4 rejects `str` in lighteval's loggers: pinned `<4` in the extra, wrapped if newer (`_xxhash_shim`);
- local data (`--data_dir`, or $OSP_EVAL_DATA): each task's files are converted once into a dataset folder under
  ~/.cache/osp-eval/lighteval-data (`lighteval_data`), and lighteval loads that folder as `hf_repo`.

Outputs, under OUTPUT_DIR/lighteval/<model>/: `<method>_w..a..kv.._<key>.json` (our summary: per-task
metric, the benchmark averages, the quantization config, timings) and a folder of the same name holding
lighteval's own results JSON (and per-sample details with --save_details).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import shutil
import tempfile
import time
import types
from pathlib import Path

from .errors import OspEvalError
from .lighteval_data import local_configs, task_data_digest
from .results import cell_key

REPO_TASKS = Path(__file__).resolve().parents[1] / "tasks" / "tasks.txt"
DEFAULT_BATCH = 32
# With --backend vllm, who scores the log-likelihood tasks by default: the faster one measured. H100, SmolLM2-135M,
# nine tasks on full data: Transformers 86 s, vLLM unfinished at 200 s (generation: vLLM 19.5 s vs 141 s); RESULTS.md
VLLM_LOGLIK_BACKEND = "hf"


# ---------------------------------------------------------------- tasks file


def parse_tasks(spec: str) -> list[tuple[str, int]]:
    """`--tasks`: a file of lines `suite|task|shots|truncate` (the reference's format; `task|shots` and
    `task` also work), or the same entries separated by commas. Returns [(task, shots)] in order."""
    looks_like_file = spec.endswith(".txt") or os.sep in spec or Path(spec).exists()
    if looks_like_file and not Path(spec).is_file():
        raise OspEvalError(f"--tasks file not found: {spec}")
    from .lighteval_tasks import TASKS  # imports lighteval (slow): after the cheap check

    if looks_like_file:
        entries = [s.strip() for s in Path(spec).read_text().split("\n")]
        entries = [s for s in entries if s and not s.startswith("#")]
    else:
        entries = [s.strip() for s in spec.split(",") if s.strip()]
    if not entries:
        raise OspEvalError(f"--tasks {spec!r} names no task")
    out = []
    for e in entries:
        parts = e.split("|")
        if len(parts) > 4:
            raise OspEvalError(f"bad task entry {e!r}: use suite|task|shots|truncate, task|shots or task")
        if len(parts) == 4:  # the truncate flag is ignored: lighteval 0.13 has no few-shot truncation (an
            parts = parts[1:3]  # over-long prompt is cut from the left to max_length instead)
        elif len(parts) == 3:
            parts = parts[1:]
        name, shots = parts[0], (parts[1] if len(parts) > 1 else "0")
        if name not in TASKS:
            raise OspEvalError(f"unknown task {name!r} in --tasks: known tasks are {', '.join(TASKS)}")
        if not shots.isdigit():
            raise OspEvalError(f"bad task entry {e!r}: the few-shot count must be a number (suite|task|shots|truncate)")
        if (name, int(shots)) not in out:
            out.append((name, int(shots)))
    return out


# ---------------------------------------------------------------- shims


def _xxhash_shim() -> None:
    """xxhash 4 requires bytes; lighteval 0.13's loggers hash `str`. Pinning `xxhash<4` is the fix (the
    `lighteval` extra does it); if a newer one is installed anyway, hand lighteval an encoding wrapper."""
    import xxhash
    from lighteval.logging import info_loggers

    if int(xxhash.VERSION.split(".")[0]) < 4 or getattr(info_loggers.xxhash, "osp_shim", False):
        return

    def xxh64(data="", *args, **kw):
        return xxhash.xxh64(data.encode() if isinstance(data, str) else data, *args, **kw)

    info_loggers.xxhash = types.SimpleNamespace(xxh64=xxh64, osp_shim=True)


@contextlib.contextmanager
def _only_our_tasks():
    """lighteval 0.13's Registry imports every built-in task module. Some fail offline (tiny_benchmarks
    downloads at import; mt_bench/mix_eval call a changed huggingface_hub API), and built-in names clash
    with the reference's (arc:easy, gsm8k, ...). We use none of them: while the pipeline is built, the
    registry's loader returns just our custom-tasks module."""
    from lighteval.tasks.registry import Registry

    original = Registry.__dict__["load_all_task_configs"]

    def ours(custom_tasks=None, load_multilingual=False):
        return Registry._extract_configs(Registry.create_custom_tasks_module(custom_tasks))

    Registry.load_all_task_configs = staticmethod(ours)
    try:
        yield
    finally:
        Registry.load_all_task_configs = original


@contextlib.contextmanager
def _quiet_datasets(arrow_cache: str | None = None):
    """`datasets` draws a progress bar per split of every task: noise next to ours. With `arrow_cache`,
    datasets' Arrow cache goes there too: lighteval's sample cache re-reads its parquet files through
    `load_dataset`, which would otherwise leave new copies in ~/.cache on every run."""
    import datasets

    was_on, was_cache = datasets.is_progress_bar_enabled(), datasets.config.HF_DATASETS_CACHE
    datasets.disable_progress_bars()
    if arrow_cache:
        datasets.config.HF_DATASETS_CACHE = Path(arrow_cache)
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = was_cache
        if was_on:
            datasets.enable_progress_bars()


def _same_order_everywhere(pipeline) -> None:
    """lighteval groups the documents by sampling method in an order that follows set iteration (it changes with
    PYTHONHASHSEED, so between processes). Rebuild the groups in a fixed order (tasks by name, methods by name,
    each task's documents in its own order): data-parallel ranks must agree on every list, and one process is then
    reproducible too."""
    docs = pipeline.documents_dict
    methods = sorted({m for task in docs.values() for d in task for m in d.sampling_methods}, key=str)
    pipeline.sampling_docs = collections.defaultdict(list, {
        m: [d for name in sorted(docs) for d in docs[name] if m in d.sampling_methods] for m in methods})


def dist_backend(device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    import torch

    return "nccl" if torch.cuda.is_available() and not str(device or "").startswith("cpu") else "gloo"


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


# ---------------------------------------------------------------- the run


def run_lighteval(model_name: str, cfg, *, tasks=str(REPO_TASKS), gguf_file=None, dtype="auto", device=None,
                  data_dir=None, max_samples=None, batch_size=DEFAULT_BATCH, max_length=None,
                  output_dir="results", save_details=False, progress=True, save_qmodel_path=None,
                  load_qmodel_path=None, backend="hf", gen_batch_size=None,
                  loglik_backend=None, devices=None) -> dict:
    """Quantize `model_name` by `cfg` in memory, evaluate `tasks` with lighteval, write lighteval's JSON and
    our summary. Returns the summary record.

    Data parallel (under torchrun, or in `parallel.launch`): every rank quantizes its own replica on
    cuda:<local rank> (or the CPU) with the same seeds, then takes rank 0's weights (`parallel.broadcast_model`),
    scores its share of the work, and gets everyone's results; only rank 0 writes files.

    backend "vllm": greedy generation runs in a vLLM engine holding the same quantized model
    (osp_eval.vllm_backend); log-likelihoods run where loglik_backend says (default VLLM_LOGLIK_BACKEND,
    the faster one measured; see benchmarks/RESULTS.md)."""
    from . import parallel
    from .pipeline import load_and_quantize, method_name, model_slug
    from .provenance import now, peak_memory, reset_peak_memory
    from .results import save_result

    t_start = time.perf_counter()
    started = now()
    reset_peak_memory()
    world = parallel.init(backend=dist_backend(device))
    device = parallel.device(device)
    if backend == "vllm" and devices not in (None, 1, "auto"):
        raise OspEvalError(f"--devices {devices} with the vLLM backend: the vLLM engine holds the model on one GPU")
    if world.size > 1 and backend == "vllm":
        # vLLM's in-process engine initialises torch.distributed for itself (a world of one); inside our group of
        # N it has not been tried on GPUs yet (lighteval_model shards its generation; lift this once it has).
        raise OspEvalError("data parallelism with the vLLM backend is not supported yet: use --backend hf")
    if world.size > 1:
        check_data_parallel(world.size, device, devices)
        devices = None  # one whole replica per process
    progress = progress and world.main
    wanted = parse_tasks(tasks)  # fail fast on bad input, before the model loads
    plan = lighteval_plan(model_name, cfg, wanted, gguf_file=gguf_file, dtype=dtype, device=device,
                          data_dir=data_dir, max_samples=max_samples, batch_size=batch_size, max_length=max_length,
                          output_dir=output_dir, load_qmodel_path=load_qmodel_path, backend=backend,
                          gen_batch_size=gen_batch_size, loglik_backend=loglik_backend)
    ddir, max_length, loglik_backend = plan["data_dir"], plan["max_length"], plan["loglik_backend"]
    src, gguf_file = plan["source"]  # a .gguf path becomes (folder, file name)

    from lighteval.logging.evaluation_tracker import EvaluationTracker
    from lighteval.pipeline import ParallelismManager, Pipeline, PipelineParameters

    from . import lighteval_tasks as lt
    from .lighteval_model import OspLightevalModel, OspModelConfig  # lighteval: imported here, not at the top

    _xxhash_shim()
    names = [n for n, _ in wanted]
    if ddir is not None:
        with parallel.rank0_first():  # one process converts the data, the others find it converted
            configs, skipped, not_exact = local_configs(names, ddir, progress)
    else:
        configs, skipped, not_exact = [lt.TASKS[n] for n in names], {}, {}
    for n, why in skipped.items():
        print(f"osp-eval: warning: skipping {n}: {why}")
    run_tasks = [(n, k) for n, k in wanted if n not in skipped]
    if not run_tasks:
        raise OspEvalError("no task left to run: " + "; ".join(skipped.values()))

    from .models import resolve_dtype
    from .offload import check_fits_whole, model_bytes
    from .sharding import resolve_devices

    inputs, dt = plan["inputs"], resolve_dtype(dtype, plan["inputs"].device)
    if resolve_devices(devices, inputs.config, dt) is None:  # one replica per process: it must fit one GPU
        check_fits_whole(model_bytes(inputs.config, dt), inputs.device, "lighteval")
    model, tok, info = load_and_quantize(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device,
                                         data_dir=data_dir, progress=progress,
                                         save_qmodel_path=save_qmodel_path if world.main else None,
                                         load_qmodel_path=load_qmodel_path, inputs=plan["inputs"], devices=devices,
                                         offload="off")  # lighteval runs whole-model forwards: no streaming
    differed = parallel.broadcast_model(model)  # replicas are rank 0's, whatever the kernels did
    layout = parallel.layout(plan["inputs"].device)
    layout["tensors_replaced_by_rank0"] = sum(parallel.gather({world.rank: differed}).values())
    method = method_name(cfg)
    slug = model_slug(model_name, gguf_file)
    stem, out = plan["stem"], plan["out"]
    module = types.ModuleType("osp_tasks")
    module.TASKS_TABLE = configs
    cache_dir = tempfile.mkdtemp(prefix="osp-lighteval-cache-")  # fresh per evaluation: see the module doc
    vllm_start = None
    try:
        # model_name is the same for every configuration of one model: only the fresh cache_dir keeps a
        # quantized model from reading another one's cached answers (the test relies on that).
        mcfg = OspModelConfig(model_name=slug, tokenizer=src, model_loading_kwargs={"gguf_file": gguf_file},
                              batch_size=batch_size, max_length=max_length, device=str(next(model.parameters()).device),
                              override_chat_template=False, cache_dir=cache_dir)
        lm = OspLightevalModel.from_model(model, mcfg)
        lm.show_progress = progress
        lm.gen_batch_size = gen_batch_size
        if backend == "vllm":
            from .vllm_backend import VllmEngine

            # max_length + 1 prompt tokens (the last is only a target) and the one generated token.
            lm.vllm_engine = VllmEngine(model, tok, max_model_len=max_length + 2)
            lm.vllm_loglik = loglik_backend == "vllm"
            vllm_start = lm.vllm_engine.start_seconds
        tracker = EvaluationTracker(output_dir=str(out / stem), save_details=save_details)
        params = PipelineParameters(launcher_type=ParallelismManager.NONE, custom_tasks_directory=module,
                                    max_samples=max_samples)
        spec = ",".join(f"{n}|{k}" for n, k in run_tasks)
        try:
            with _only_our_tasks(), _quiet_datasets():
                pipeline = Pipeline(tasks=spec, pipeline_parameters=params, evaluation_tracker=tracker, model=lm)
            _same_order_everywhere(pipeline)
        except Exception as e:  # dataset loading: the hub, a revision, a local folder
            if ddir is not None:
                raise
            raise OspEvalError(f"could not load the tasks' datasets from the hub ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); offline, pass --data_dir") from e
        t_eval = time.perf_counter()
        with _quiet_datasets(arrow_cache=os.path.join(cache_dir, "arrow")):
            pipeline.evaluate()
            eval_seconds = time.perf_counter() - t_eval
            if world.main:
                pipeline.save_and_push_results()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    scores = tracker.metrics_logger.metric_aggregated  # {"task|shots": {metric: value, metric_stderr: ...}}
    per_task = {}
    for n, k in run_tasks:
        full = f"{n}|{k}"
        metric, task_cfg = lt.MAIN_METRIC[n], next(c for c in configs if c.name == n)
        per_task[n] = {
            "metric": metric, "value": scores.get(full, {}).get(metric),
            "stderr": scores.get(full, {}).get(f"{metric}_stderr"), "shots": k,
            "n_samples": len(pipeline.documents_dict[full]), "n_available": len(pipeline.tasks_dict[full].eval_docs()),
            "data": "local" if ddir is not None else "hub", "dataset": task_cfg.hf_repo,
            "subset": task_cfg.hf_subset, "revision": task_cfg.hf_revision, "split": task_cfg.evaluation_splits[0],
            "not_exact": not_exact.get(n),
        }
    bench = benchmarks(per_task)
    record = {
        "kind": "lighteval",
        "model": model_name, "gguf_file": gguf_file, "method": method,
        "bits": f"{cfg.w_bits}-{cfg.a_bits}-{cfg.k_bits}", "config": cfg.to_dict(), **info,
        "tasks": per_task, "skipped": skipped, **bench,
        "max_samples": max_samples, "full_splits": max_samples is None,
        "batch_size": batch_size, "gen_batch_size": gen_batch_size or batch_size, "max_length": max_length,
        "fewshot_seed": lt.FEWSHOT_SEED, "backend": backend, "parallel": layout,
        "backends": {"loglikelihood": loglik_backend, "generation": backend},
        "tokenization": "context+continuation tokenized together, then split",
        "data_dir": str(ddir) if ddir else None,
        "eval_seconds": eval_seconds, "total_seconds": time.perf_counter() - t_start, "vllm_start_seconds": vllm_start,
        "lighteval_output": str(out / stem),
        "model_fingerprint": plan["inputs"].fingerprint,
        "identity": plan["identity"],
        "peak_memory": peak_memory(),
    }
    if not world.main:
        return record
    try:
        record["result_path"] = str(save_result(record, out, stem, started=started))
    except OSError as e:
        raise OspEvalError(f"could not write the summary to {out / stem}.json ({e.strerror or e})") from e
    return record


def lighteval_plan(model_name: str, cfg, wanted, *, gguf_file=None, dtype="auto", device=None, data_dir=None,
                   max_samples=None, batch_size=DEFAULT_BATCH, max_length=None, output_dir="results",
                   load_qmodel_path=None, backend="hf", gen_batch_size=None, loglik_backend=None) -> dict:
    """Everything checked before the model loads (flags, data, model files, device, output folder), and the
    run's identity (model, task data and recipe contents) and summary path. The table uses it to find a
    cached summary."""
    from .data import data_dir as resolve_data_dir
    from .models import resolve_model
    from .pipeline import _dtype_name, method_name, model_slug, preflight

    if max_samples is not None and max_samples <= 0:
        raise OspEvalError(f"--max_samples {max_samples} must be positive")
    if batch_size <= 0 or (gen_batch_size is not None and gen_batch_size <= 0):
        raise OspEvalError(f"--batch_size {batch_size} and --gen_batch_size {gen_batch_size} must be positive")
    if backend not in ("hf", "vllm"):
        raise OspEvalError(f"backend {backend!r}: choose hf or vllm")
    if loglik_backend not in (None, "hf", "vllm"):
        raise OspEvalError(f"--loglik_backend {loglik_backend!r}: choose hf or vllm")
    if backend == "hf" and loglik_backend == "vllm":
        raise OspEvalError("--loglik_backend vllm needs the vLLM path (lighteval_ptq_vllm.py or --backend vllm)")
    loglik_backend = backend if backend == "hf" else (loglik_backend or VLLM_LOGLIK_BACKEND)
    ddir = resolve_data_dir(data_dir)
    if ddir is None and _offline():
        raise OspEvalError("offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): pass --data_dir DIR (or set "
                           "$OSP_EVAL_DATA) pointing at a folder laid out like ../shared/data")
    inputs = preflight(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device, data_dir=data_dir,
                       output_dir=output_dir, load_qmodel_path=load_qmodel_path)
    source = resolve_model(model_name, gguf_file)
    positions = getattr(inputs.config.get_text_config(), "max_position_embeddings", None) or 2048
    max_length = max_length or min(2048, positions)
    if max_length > positions:
        raise OspEvalError(f"--max_length {max_length} exceeds the model's {positions} positions")
    data = ({n: task_data_digest(n, ddir) for n, _ in wanted} if ddir is not None
            else {n: "hub (pinned revision)" for n, _ in wanted})
    backends = {} if backend == "hf" else {"backend": backend, "loglik_backend": loglik_backend}
    identity = inputs.identity("lighteval", cfg, tasks=[list(t) for t in wanted], task_data=data,
                               max_samples=max_samples, dtype=_dtype_name(dtype, inputs.device),
                               max_length=max_length, **backends)
    stem = f"{method_name(cfg)}_w{cfg.w_bits}a{cfg.a_bits}kv{cfg.k_bits}_{cell_key(**identity)}"
    return {"inputs": inputs, "identity": identity, "stem": stem, "data_dir": ddir, "source": source,
            "max_length": max_length, "loglik_backend": loglik_backend,
            "out": Path(output_dir) / "lighteval" / model_slug(model_name, gguf_file)}


def benchmarks(per_task: dict) -> dict:
    """The ten OSP benchmarks from the per-task scores. ARC easy and challenge form one benchmark, their
    unweighted mean (an assumption: the reference counts 10 benchmarks for 11 tasks and does not say how).

    `average` covers only benchmarks scored on the reference's exact data and split; `average_all` also
    covers the inexact ones (local fallbacks), so that both are visible and never silently mixed."""
    from .lighteval_tasks import BENCHMARK

    groups: dict[str, list[str]] = {}
    for n in per_task:
        groups.setdefault(BENCHMARK[n], []).append(n)
    bench = {}
    for b, members in groups.items():
        vals = [per_task[n]["value"] for n in members]
        if any(v is None for v in vals):
            continue
        partial = b == "arc" and len(members) < 2
        bench[b] = {"value": sum(vals) / len(vals), "tasks": members,
                    "not_exact": "; ".join(f"{n}: {per_task[n]['not_exact']}" for n in members
                                           if per_task[n]["not_exact"]) or (
                        "only one of the two ARC sets" if partial else None)}
    exact = [v["value"] for v in bench.values() if not v["not_exact"]]
    every = [v["value"] for v in bench.values()]
    return {
        "benchmarks": bench,
        "average": sum(exact) / len(exact) if exact else None,
        "average_over": [b for b, v in bench.items() if not v["not_exact"]],
        "average_all": sum(every) / len(every) if every else None,
        "average_is_the_ten": len(exact) == 10,
    }


def format_table(r: dict) -> str:
    def pct(v):
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    lines = [f"{r['method']} W{r['config']['w_bits']}A{r['config']['a_bits']}KV{r['config']['k_bits']}  {r['model']}",
             f"{'task':<16}{'metric':<18}{'value':>7}{'stderr':>8}{'n':>7}  shots  note"]
    for n, t in r["tasks"].items():
        n_s = "-" if t["n_samples"] is None else str(t["n_samples"])
        note = f"NOT EXACT: {t['not_exact']}" if t["not_exact"] else ""
        lines.append(f"{n:<16}{t['metric']:<18}{pct(t['value']):>7}{pct(t['stderr']):>8}{n_s:>7}  "
                     f"{t['shots']:>5}  {note}")
    for n, why in r["skipped"].items():
        lines.append(f"{n:<16}SKIPPED  {why}")
    lines.append("")
    names = ", ".join(r["average_over"]) or "none"
    ten = " (the ten benchmarks)" if r["average_is_the_ten"] else ""
    lines.append(f"average, exact data only{ten}: {pct(r['average']).strip()}  over {len(r['average_over'])}: {names}")
    lines.append(f"average incl. not-exact data: {pct(r['average_all']).strip()}  over {len(r['benchmarks'])} "
                 "benchmarks (ARC = mean of easy and challenge)")
    if not r["full_splits"]:
        lines.append(f"PARTIAL: --max_samples {r['max_samples']} docs per task; not comparable with full runs")
    engine = f"vLLM start {r['vllm_start_seconds']:.1f}s, " if r.get("vllm_start_seconds") is not None else ""
    lines.append(f"timings: quantize {r['quantize_seconds']:.1f}s, {engine}evaluate {r['eval_seconds']:.1f}s, "
                 f"total {r['total_seconds']:.1f}s  (log-likelihoods: {r['backends']['loglikelihood']}, "
                 f"generation: {r['backends']['generation']})")
    lines.append(f"summary: {r['result_path']}")
    lines.append(f"lighteval output: {r['lighteval_output']}")
    return "\n".join(lines)


def check_data_parallel(n: int, device, devices=None) -> None:
    """N data-parallel processes, one whole replica each: one GPU per process."""
    import torch

    if devices not in (None, 1, "auto"):
        raise OspEvalError(f"--devices {devices} with {n} data-parallel processes: each replica holds one GPU "
                           "(pipeline sharding and data parallelism do not combine); drop one of them")
    gpus = torch.cuda.device_count() if dist_backend(device) == "nccl" else 0
    if gpus and n > gpus:
        raise OspEvalError(f"--data_parallel {n}: only {gpus} GPU(s) visible (one replica per GPU)")
