"""Excess kurtosis of the hidden states, as the OSP paper's `evaluate_kurtosis.py` (PROTOCOL.md §6).

Text: the first 1000 C4 en validation documents, each followed by "\\n\\n", tokenised once with the
default tokenizer settings; the first nrows×seqlen tokens become nrows rows of seqlen.

Modes:
  reference  the paper's quirk: every token of a row is its own sequence of length 1 (no context);
  context    each row is one sequence of seqlen tokens.

Both use every hidden state transformers returns (embedding output, layer outputs 1..L-1, final-norm
output), cast to fp32: kurtosis per token, mean over tokens, then mean over all rows × (L+1) values.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import OspEvalError

MODES = ("reference", "context")


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Per-row excess kurtosis over the last dim, exactly the reference's formula.

    κ = mean_d(x⁴) / std_d(x)⁴ − 3, then relu. Two deliberate quirks of the reference are kept:
    the 4th moment is raw (not centred on the mean) and the std is the unbiased one (divides by d−1).
    A Gaussian row gives ≈ 0; a row with one huge entry gives ≈ d. Rows with zero std give nan/inf,
    as in the reference.
    """
    return (x.pow(4).mean(-1) / x.std(-1).pow(4) - 3).relu()


def c4_kurtosis_text(data_dir: str | None = None, ndocs: int = 1000) -> str:
    from .data import c4_docs

    docs = c4_docs(data_dir, ndocs)
    if len(docs) < ndocs:
        raise OspEvalError(f"--ndocs {ndocs}: the C4 sample has only {len(docs)} documents")
    return "".join(d + "\n\n" for d in docs)


def token_rows(tokenizer, text: str, nrows: int = 128, seqlen: int = 2048) -> torch.Tensor:
    """The first nrows×seqlen tokens of `text` as [nrows, seqlen] (default special tokens, as the reference)."""
    from .data import _encode

    if nrows <= 0 or seqlen <= 0:
        raise OspEvalError(f"{nrows} rows of {seqlen} tokens: both must be positive")
    ids = _encode(tokenizer, text, add_special_tokens=True)
    need = nrows * seqlen
    if len(ids) < need:
        raise OspEvalError(f"the C4 text has {len(ids)} tokens, fewer than the {need} needed ({nrows} rows × "
                           f"{seqlen} tokens): ask for fewer or shorter rows, or more documents (--ndocs)")
    return torch.tensor(ids[:need], dtype=torch.long).view(nrows, seqlen)


def _hidden_states(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # The base model (no lm_head): its hidden states are all we need, logits would only cost memory.
    base = getattr(model, "base_model", model)
    out = base(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise OspEvalError(f"{type(model).__name__} returned no hidden states with output_hidden_states=True: "
                           "kurtosis needs a transformers model that supports it")
    return hs


@torch.no_grad()
def row_kurtosis(model, row: torch.Tensor, mode: str = "reference") -> torch.Tensor:
    """Mean-over-tokens kurtosis of each hidden state for one row of token ids: fp32 [L+1]."""
    device = next(model.parameters()).device
    # reference: a [seqlen, 1] batch (each token alone); context: one [1, seqlen] sequence.
    ids = row.view(-1, 1) if mode == "reference" else row.view(1, -1)
    hs = _hidden_states(model, ids.to(device))
    return torch.stack([excess_kurtosis(h.float()).mean() for h in hs]).cpu()


@torch.no_grad()
def streamed_row_kurtosis(model, rows: torch.Tensor, mode: str = "reference", progress: bool = True) -> torch.Tensor:
    """`row_kurtosis` of every row, layer-major (offload.walk): [nrows, L+1], the same numbers (each row's
    hidden states are the same tensors, reduced the same way)."""
    from .arch import get_adapter
    from .offload import compute_device, head, run_layers, storage

    base = getattr(model, "base_model", model)
    layers = get_adapter(model).layers(model)
    device = compute_device(model)
    nrows, seqlen = rows.shape
    ids = rows.reshape(-1, 1) if mode == "reference" else rows  # one row = `bs` rows of ids
    bs = seqlen if mode == "reference" else 1
    per_row = torch.empty(nrows, len(layers) + 1)
    bar = tqdm(total=len(layers), desc=f"kurtosis ({mode}, streamed)", disable=not progress, leave=False)

    def each(i, h):  # the embedding output (i = -1), then layer outputs 1..L-1 (the last one is normed first)
        if i < len(layers) - 1:
            for r in range(nrows):
                per_row[r, i + 1] = excess_kurtosis(h[r * bs : (r + 1) * bs].to(device).float()).mean().cpu()
        bar.update(i >= 0)

    nbytes = rows.numel() * model.config.hidden_size * next(model.parameters()).element_size()
    hs, _ = run_layers(base, layers, ids, bs, device, storage(device, nbytes), each)
    bar.close()
    for r in range(nrows):
        out = head(base, layers, ids[r * bs : (r + 1) * bs], hs[r * bs : (r + 1) * bs], output_hidden_states=True)
        per_row[r, -1] = excess_kurtosis(out.hidden_states[-1].float()).mean().cpu()
    return per_row


def kurtosis(model, rows: torch.Tensor, mode: str = "reference", progress: bool = True) -> dict:
    """Kurtosis of `model` on [nrows, seqlen] token ids: the overall mean and the per-hidden-state means."""
    if mode not in MODES:
        raise OspEvalError(f"unknown kurtosis mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "context":
        from .ppl import check_seqlen

        check_seqlen(model.config, rows.shape[1])
    t0 = time.perf_counter()
    from .offload import is_streamed

    if is_streamed(model):
        per_row = streamed_row_kurtosis(model, rows, mode, progress)
    else:
        bar = tqdm(rows, desc=f"kurtosis ({mode})", disable=not progress, leave=False)
        per_row = torch.stack([row_kurtosis(model, r, mode) for r in bar])  # [nrows, L+1]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    per_state = per_row.mean(0)
    return {
        "mode": mode,
        "kurtosis": per_row.mean().item(),  # = mean over all nrows × (L+1) values
        "per_layer": per_state.tolist(),  # index 0: embeddings, 1..L-1: layer outputs, L: final norm
        "nrows": rows.shape[0],
        "seqlen": rows.shape[1],
        "tokens": rows.numel(),
        "hidden_states": per_row.shape[1],
        "seconds": time.perf_counter() - t0,
    }


def state_names(n: int) -> list[str]:
    """Names of the n hidden states transformers returns."""
    return ["embeddings"] + [f"layer {i}" for i in range(1, n - 1)] + ["final norm"]


def run_kurtosis(model_name: str, cfg, *, modes=("reference",), gguf_file=None, dtype="auto", device=None,
                 data_dir=None, nrows=128, seqlen=2048, ndocs=1000, output_dir="results", progress=True,
                 offload="auto") -> dict:
    """Load (and optionally quantize) a model, measure its kurtosis in each mode, write and return the record."""
    from .pipeline import load_and_quantize, method_name, model_slug, preflight
    from .provenance import now, peak_memory, reset_peak_memory, text_sha256
    from .results import cell_key, save_result

    reset_peak_memory()
    for m in modes:
        if m not in MODES:
            raise OspEvalError(f"unknown kurtosis mode {m!r}: use one of {', '.join(MODES)}")
    if "context" in modes:  # fail fast, before loading the weights
        from .models import load_config, resolve_model
        from .ppl import check_seqlen

        check_seqlen(load_config(*resolve_model(model_name, gguf_file)), seqlen)
    text = c4_kurtosis_text(data_dir, ndocs)  # fail fast on missing data, before loading the model
    inputs = preflight(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device, data_dir=data_dir,
                       output_dir=output_dir)
    started = now()
    model, tok, info = load_and_quantize(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device,
                                         data_dir=data_dir, progress=progress, inputs=inputs, offload=offload)
    t0 = time.perf_counter()
    rows = token_rows(tok, text, nrows, seqlen)
    info["tokenize_seconds"] = time.perf_counter() - t0
    results = {m: kurtosis(model, rows, m, progress) for m in modes}
    method = method_name(cfg)
    record = {
        "kind": "kurtosis",
        "dataset": f"C4 en validation, first {ndocs} documents + '\\n\\n', default special tokens",
        "model": model_name,
        "gguf_file": gguf_file,
        "method": method,
        "config": cfg.to_dict(),
        "model_fingerprint": inputs.fingerprint,
        "data": {"sha256": text_sha256(text), "chars": len(text)},
        **info,
        "nrows": nrows,
        "seqlen": seqlen,
        "ndocs": ndocs,
        "state_names": state_names(next(iter(results.values()))["hidden_states"]),
        "results": results,
        "peak_memory": peak_memory(),
    }
    key = cell_key(**inputs.identity("kurtosis", cfg), data=text_sha256(text), modes=list(modes), nrows=nrows,
                   seqlen=seqlen, ndocs=ndocs, dtype=info["dtype"])
    stem = f"{method}_{'+'.join(modes)}_{key}"
    out = Path(output_dir) / "kurtosis" / model_slug(model_name, gguf_file)
    record["result_path"] = str(save_result(record, out, stem, started=started))
    return record


def format_table(record: dict) -> str:
    """Per-hidden-state table, one column per mode, then the overall numbers."""
    modes = list(record["results"])
    lines = [f"{'hidden state':<14}" + "".join(f"{m:>12}" for m in modes)]
    for i, name in enumerate(record["state_names"]):
        lines.append(f"{name:<14}" + "".join(f"{record['results'][m]['per_layer'][i]:>12.3f}" for m in modes))
    lines.append(f"{'overall':<14}" + "".join(f"{record['results'][m]['kurtosis']:>12.3f}" for m in modes))
    return "\n".join(lines)


def _cli(args) -> None:
    from .cli_args import config_from_args

    cfg = config_from_args(args, default_method="rtn")
    modes = MODES if args.mode == "both" else (args.mode,)
    r = run_kurtosis(args.model, cfg, modes=modes, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
                     data_dir=args.data_dir, nrows=args.nrows, seqlen=args.seqlen, ndocs=args.ndocs,
                     output_dir=args.output_dir, progress=not args.no_progress, offload=args.offload)
    print(format_table(r))
    for m, res in r["results"].items():
        print(f"{r['method']} {r['model']}: kurtosis ({m}) = {res['kurtosis']:.4f} "
              f"[{res['nrows']}×{res['seqlen']} tokens, {res['seconds']:.1f}s]")
    print(f"result: {r['result_path']}")


def add_cli(subparsers) -> None:
    """Register `osp-eval kurtosis`."""
    from .cli_args import add_model_args, add_offload_arg, add_quant_args, positive_int

    p = subparsers.add_parser("kurtosis", help="excess kurtosis of the hidden states on C4 (the OSP protocol)")
    add_model_args(p)
    p.add_argument("--mode", choices=("reference", "context", "both"), default="reference",
                   help="reference: each token alone (the paper's numbers); context: each row one sequence")
    p.add_argument("--nrows", type=positive_int, default=128)
    p.add_argument("--seqlen", type=positive_int, default=2048)
    p.add_argument("--ndocs", type=positive_int, default=1000, help="C4 documents to tokenise")
    add_offload_arg(p)
    add_quant_args(p)
    p.set_defaults(func=_cli)
