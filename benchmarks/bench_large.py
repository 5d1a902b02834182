"""8B-class and 70B-shaped random-weight models: the OSP rows in-GPU or layer-streamed (osp_eval/offload.py).

  python3 benchmarks/bench_large.py --part 8b --models llama3-8b,qwen2.5-7b --rows rtn,ffn_had,gptq,quarot,spinquant \
      --nwindows 40 --data_dir .gpu/data --out $OUT
  python3 benchmarks/bench_large.py --part 70b --layers 4 --nwindows 8 --out $OUT
  python3 benchmarks/bench_large.py --tiny --part 8b --out /tmp/x      # CPU dry run (tests)

Weights are random (built from the config in bf16, no hub), so PPL only checks that nothing breaks. Windows are
WikiText-2 test text when --data_dir holds wikitext-2-raw-v1/test.jsonl (tokenized with --tokenizer, else its UTF-8
bytes taken as token ids: real text, no tokenizer needed), else random tokens; the JSON says which. GPTQ calibrates
on random tokens (--nsamples × --calib_seqlen). `spinquant` = QuaRot + GPTQ loading a rotation file: with
--spinquant_steps N, R1/R2 trained first (N steps of 8 calibration windows, time per step and peak memory in the
row's "spinquant" field; --recompute_rotations and --micro_batch_size as in `osp-eval spinquant-train`), else random
Hadamards saved as R.bin (the evaluation path's cost only). Training longer than one command may run:
--spinquant_max_seconds S --spinquant_state DIR stops after S seconds with the rotations in DIR, and the same command
again continues from there (the row is evaluated once training is complete; its times sum the pieces).
Row `kurtosis`: the OSP outlier metric (excess kurtosis of every hidden state, tokens fed alone as the protocol
does) of the unquantized model on --kurtosis_rows rows: time and peak memory.
Part 70b: a 70B-shaped model truncated to --layers, streamed and in-GPU: per-layer times, peak memory, whether the
NLLs agree, and the 80-layer projection (fixed part + 80 × the mean streamed layer time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osp_eval.apply import quantize_  # noqa: E402
from osp_eval.arch import get_adapter  # noqa: E402
from osp_eval.config import KERNELS  # noqa: E402
from osp_eval.offload import GiB, stream_model  # noqa: E402
from osp_eval.ppl import window_nlls  # noqa: E402
from osp_eval.results import device_info, versions  # noqa: E402
from osp_eval.table import cell_config  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # Llama 3.1
MODELS = {
    "llama3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                                rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768,
                                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "llama3-70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                 intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072,
                                 rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE)),
}
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=256)


def make_config(name: str, tiny: bool, layers: int | None = None):
    from transformers import LlamaConfig, Qwen2Config

    family, kw = MODELS[name]
    kw = {**kw, **(TINY | {"num_hidden_layers": 2} if tiny else {})}
    if layers:
        kw["num_hidden_layers"] = layers
    cls, arch = (LlamaConfig, "LlamaForCausalLM") if family == "llama" else (Qwen2Config, "Qwen2ForCausalLM")
    return cls(**kw, tie_word_embeddings=False, architectures=[arch])  # Qwen2's q/k/v biases are the default


def _no_init():
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # older transformers: initialise (slower, same result after load_state_dict)
        import contextlib

        return contextlib.nullcontext()


def random_state(config, dtype, device, seed: int = 0) -> dict:
    """The random weights once, on the CPU (built on `device`: the GPU initialises fast)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = {k: v.to("cpu") for k, v in m.state_dict().items()}
    del m
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return sd


def fresh(config, sd: dict, dtype, device):
    """A new model object holding `sd` on `device` (quantization rewires modules: every row needs its own)."""
    from transformers import AutoModelForCausalLM

    with _no_init(), torch.device(device):
        m = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    m.load_state_dict(sd)
    return m.eval().requires_grad_(False)


def eval_windows(args, vocab: int) -> tuple[torch.Tensor, str]:
    from osp_eval.ppl import make_windows

    path = Path(args.data_dir or "") / "wikitext-2-raw-v1" / "test.jsonl"
    if args.data_dir and path.is_file():
        from osp_eval.data import wikitext2_text

        text = wikitext2_text("test", args.data_dir)
        if args.tokenizer:
            from osp_eval.data import tokenize_text
            from osp_eval.models import load_tokenizer

            ids, source = tokenize_text(load_tokenizer(args.tokenizer), text), f"wikitext2 test, {args.tokenizer}"
        else:
            ids, source = torch.tensor(list(text.encode("utf-8"))), "wikitext2 test, UTF-8 bytes as token ids"
        return make_windows(ids % vocab, args.seqlen, args.nwindows), source
    ids = torch.randint(0, vocab, (args.nwindows, args.seqlen), generator=torch.Generator().manual_seed(0))
    return ids, "random tokens (no WikiText-2 file under --data_dir)"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
            "gpu_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3)}


def train_spinquant(config, sd, calib, args, device, dtype) -> tuple[str, dict]:
    """SpinQuant R1/R2 training on the calibration windows: seconds per step, peak memory; R.bin in a temp folder,
    or in --spinquant_state, where a run stopped by --spinquant_max_seconds is continued by the next command."""
    from osp_eval.spinquant import save_rotations, train_segment

    path = Path(args.spinquant_state or tempfile.mkdtemp()) / "R.bin"
    side = Path(f"{path}.json")
    before = json.loads(side.read_text()) if args.spinquant_state and side.is_file() else None
    if before is not None and before["steps"] != args.spinquant_steps:
        sys.exit(f"{side} is a run of {before['steps']} steps, not --spinquant_steps {args.spinquant_steps}")
    if before is not None and before["complete"]:
        return str(path), before
    info = {"steps": args.spinquant_steps, "batch_size": 8, "micro_batch_size": args.micro_batch_size or 8,
            "recompute_rotations": args.recompute_rotations}
    model = fresh(config, sd, dtype, device)
    cfg = cell_config("spinquant", "4-4-4", nsamples=len(calib), calib_seqlen=calib.shape[1], kernels=args.kernels)
    _sync()
    rot, run = train_segment(model, cfg, calib, path, before, steps=args.spinquant_steps, batch_size=8,
                             micro_batch_size=args.micro_batch_size, progress=False,
                             recompute_rotations=args.recompute_rotations, max_seconds=args.spinquant_max_seconds)
    info |= run | {"loss_first": run["losses"][0], "loss_last": run["losses"][-1], **_peak()}
    info["seconds_per_step"] = info["train_seconds"] / run["steps_done"]
    save_rotations(path, rot.state(), info)
    del model, rot
    return str(path), info


def run(config, sd, row: str, streamed: bool, windows, calib, args, device, dtype, rotation=None) -> dict:
    """One row: fresh model (on the CPU and streamed, or on the device), quantize, PPL; times and peak memory."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = {"row": row, "streamed": streamed}
    try:
        if row == "spinquant" and args.spinquant_steps:
            rotation, out["spinquant"] = train_spinquant(config, sd, calib, args, device, dtype)
            if not out["spinquant"]["complete"]:  # the next command continues it (--spinquant_state)
                out["error"] = (f"SpinQuant stopped after {out['spinquant']['steps_done']} of "
                                f"{args.spinquant_steps} steps (--spinquant_max_seconds): not evaluated")
                return out | _peak()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()  # the row's own peak from here; training's is in "spinquant"
        t0 = time.perf_counter()
        model = fresh(config, sd, dtype, "cpu" if streamed else device)
        if streamed:
            stream_model(model, get_adapter(model).layers(model), device)
        _sync()
        out["load_seconds"] = time.perf_counter() - t0
        if row == "kurtosis":  # the OSP outlier metric of the unquantized model (reference mode: tokens alone)
            from osp_eval.kurtosis import kurtosis

            rows = windows[torch.arange(args.kurtosis_rows) % len(windows)]
            k = kurtosis(model, rows, progress=False)
            del model
            return out | {"kurtosis": k["kurtosis"], "kurtosis_seconds": k["seconds"], "kurtosis_rows": k["nrows"],
                          "kurtosis_seqlen": k["seqlen"]} | _peak()
        if row != "fp":
            extra = {"optimized_rotation_path": rotation} if row == "spinquant" else {}
            extra["kernels"] = args.kernels
            cfg = cell_config(row, "4-4-4", nsamples=len(calib), calib_seqlen=calib.shape[1], **extra)
            t0 = time.perf_counter()
            quantize_(model, cfg, calib, progress=False)
            _sync()
            out["quantize_seconds"] = time.perf_counter() - t0
            if getattr(model, "osp_gptq_stats", None):
                out["gptq_layer_seconds"] = model.osp_gptq_stats["layer_seconds"]
        t0 = time.perf_counter()
        nlls = window_nlls(model, windows, args.batch_size, progress=False)
        _sync()
        out["eval_seconds"] = time.perf_counter() - t0
        out["tokens_per_second"] = windows.numel() / out["eval_seconds"]
        out["ppl"] = float(torch.exp(nlls.mean()))
        if getattr(model, "osp_stream_stats", None):
            out["ppl_layer_seconds"] = model.osp_stream_stats["layer_seconds"]
            out["hidden_store"] = model.osp_stream_stats["store"]
        out["nlls"] = nlls.tolist()
        del model
    except Exception as e:  # OOM in-GPU is a result too
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    out.update(_peak())
    return out


def _rotation_file(config, dtype) -> str:
    """A SpinQuant-format R.bin with random Hadamard R1/R2 (what `spinquant` loads)."""
    from osp_eval.arch import adapter_for_config
    from osp_eval.config import QuantConfig
    from osp_eval.rotation import draw_rotations

    dims = adapter_for_config(config).config_dims(config)
    r1, r2s = draw_rotations(QuantConfig(rotate=True), dims, "cpu")
    path = Path(tempfile.mkdtemp()) / "R.bin"
    torch.save({"R1": r1, **{f"model.layers.{i}.self_attn.R2": r for i, r in enumerate(r2s)}}, path)
    return str(path)


def _line(r: dict, name: str) -> str:
    if "error" in r:
        return f"{name:12s} {r['row']:10s} {'stream' if r['streamed'] else 'in-GPU':7s} FAILED {r['error']}"
    if "kurtosis" in r:
        return (f"{name:12s} {r['row']:10s} {'stream' if r['streamed'] else 'in-GPU':7s} {r['kurtosis_rows']} rows x "
                f"{r['kurtosis_seqlen']} tokens: {r['kurtosis_seconds']:7.1f}s  kurtosis {r['kurtosis']:.3f}  peak "
                f"{r.get('gpu_peak_allocated_gib', '-')} GiB")
    return (f"{name:12s} {r['row']:10s} {'stream' if r['streamed'] else 'in-GPU':7s} "
            f"quant {r.get('quantize_seconds', 0):8.1f}s  eval {r['eval_seconds']:7.1f}s "
            f"{r['tokens_per_second']:9.0f} tok/s  ppl {r['ppl']:10.2f}  peak {r.get('gpu_peak_allocated_gib', '-')} GiB")


def part_8b(args, device, dtype, windows, calib, save) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        config = make_config(name, args.tiny)
        sd = random_state(config, dtype, device)
        rot = _rotation_file(config, dtype) if "spinquant" in args.rows else None
        for row in args.rows.split(","):
            for streamed in {"off": [False], "on": [True], "both": [False, True]}[args.offload]:
                r = {"model": name, **run(config, sd, row, streamed, windows, calib, args, device, dtype, rot)}
                print(_line(r, name), flush=True)
                rows.append(r)
                save(rows)  # a call cut off by its time limit keeps the rows done so far
        del sd
    return rows


def part_70b(args, device, dtype, windows, calib, save) -> dict:
    config = make_config("llama3-70b", args.tiny, args.layers)
    n = config.num_hidden_layers
    sd = random_state(config, dtype, device)
    res = {"layers": n, "weights_gib": sum(v.numel() * v.element_size() for v in sd.values()) / GiB, "runs": []}
    for row in ("fp", "gptq"):  # fp: PPL eval alone; gptq: GPTQ (W4A4KV4 + FFN Hadamard) then PPL
        pair = {}
        for streamed in (True, False):
            r = run(config, sd, row, streamed, windows, calib, args, device, dtype)
            print(_line(r, f"70b/{n}L"), flush=True)
            res["runs"].append(r)
            pair[streamed] = r
            save(res)
        s, g = pair[True], pair[False]
        if "nlls" in s and "nlls" in g:
            diff = max(abs(a - b) for a, b in zip(s["nlls"], g["nlls"]))
            res[f"{row}_streamed_equals_in_gpu"] = diff == 0
            res[f"{row}_max_nll_diff"] = diff
            print(f"70b/{n}L {row}: streamed vs in-GPU NLLs: max |diff| {diff:.3g} "
                  f"({'identical' if diff == 0 else 'DIFFER'})", flush=True)
        if "error" not in s:  # 80-layer projection: the fixed part plus 80 mean streamed layers
            for what, key, total in (("ppl", "ppl_layer_seconds", s["eval_seconds"]),
                                     ("gptq", "gptq_layer_seconds", s.get("quantize_seconds"))):
                per = s.get(key)
                if per and total is not None and (row == "gptq" or what == "ppl"):
                    mean = sum(per) / len(per)
                    proj = total - sum(per) + 80 * mean
                    res[f"{row}_{what}_per_layer_seconds"] = mean
                    res[f"{row}_{what}_projected_80_layers_seconds"] = proj
                    print(f"70b/{n}L {row} {what}: {mean:.2f} s per streamed layer -> 80 layers ≈ {proj:.0f} s",
                          flush=True)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("8b", "70b"), default="8b")
    p.add_argument("--models", default="llama3-8b,qwen2.5-7b", help="part 8b: " + ", ".join(list(MODELS)[:2]))
    p.add_argument("--rows", default="rtn,ffn_had,gptq,quarot,spinquant")
    p.add_argument("--offload", choices=("off", "on", "both"), default="off", help="part 8b: in-GPU, streamed or both")
    p.add_argument("--layers", type=int, default=4, help="part 70b: decoder layers kept")
    p.add_argument("--nwindows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows (random tokens)")
    p.add_argument("--calib_seqlen", type=int, default=2048)
    p.add_argument("--data_dir", default=None, help="folder with wikitext-2-raw-v1/test.jsonl (e.g. .gpu/data)")
    p.add_argument("--tokenizer", default=None, help="tokenize WikiText-2 with this tokenizer (default: UTF-8 bytes)")
    p.add_argument("--spinquant_steps", type=int, default=0, help="row spinquant: train R1/R2 this many steps first")
    p.add_argument("--recompute_rotations", action="store_true", help="rotation training keeps no fp32 weight copies")
    p.add_argument("--spinquant_max_seconds", type=float, default=None,
                   help="stop rotation training after this many seconds (continued by the next command that names "
                        "the same --spinquant_state)")
    p.add_argument("--kurtosis_rows", type=int, default=128, help="row kurtosis: rows of --seqlen tokens (the OSP "
                   "protocol: 128 x 2048), the eval windows reused cyclically")
    p.add_argument("--spinquant_state", default=None, help="folder for R.bin of a training run spread over commands")
    p.add_argument("--micro_batch_size", type=int, default=None, help="rotation training windows per forward (of 8)")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="osp_eval --kernels of every row (fast: GPTQ/SpinQuant's inexact GPU arithmetic)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (dry run)")
    p.add_argument("--out", default=None, help="JSON file, or a folder for bench_large_<part>.json")
    args = p.parse_args(argv)
    for m in args.models.split(","):
        if m not in MODELS or m == "llama3-70b":
            p.error(f"--models: unknown model {m!r} (choose from llama3-8b, qwen2.5-7b)")
    for r in args.rows.split(","):
        if r not in ("fp", "rtn", "ffn_had", "gptq", "quarot", "spinquant", "kurtosis"):
            p.error(f"--rows: unknown row {r!r}")
    if args.tiny:
        args.seqlen, args.calib_seqlen = min(args.seqlen, 32), min(args.calib_seqlen, 32)
        args.nwindows, args.nsamples = min(args.nwindows, 3), min(args.nsamples, 4)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vocab = (TINY if args.tiny else MODELS["llama3-8b"][1])["vocab_size"]  # the smallest vocab of the models
    windows, source = eval_windows(args, vocab)
    calib = torch.randint(0, vocab, (args.nsamples, args.calib_seqlen), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    record = {"part": args.part, "args": vars(args), "eval_data": source, "calibration": "random tokens",
              "dtype": str(dtype), "compute_device": device, "versions": versions(), "device": device_info()}
    key = "rows" if args.part == "8b" else "70b"

    def save(result, final=False):
        import resource

        record.update({key: result, "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                       "seconds": time.perf_counter() - t0, "complete": final,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if args.out:
            out = Path(args.out)
            if out.suffix != ".json":
                out = out / f"bench_large_{args.part}{'_tiny' if args.tiny else ''}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2, default=str) + "\n")
            if final:
                print(f"saved {out}")

    part = part_8b if args.part == "8b" else part_70b
    save(part(args, device, dtype, windows, calib, save), final=True)
    return record


if __name__ == "__main__":
    main()
