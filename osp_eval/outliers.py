"""Where the outliers are: per-layer largest activations of the residual stream and of every decoder Linear's
input, the channels and tokens that carry them, and plots of both (cf. the massive-activation papers).

Residual stream index 0 is the embedding output and index i (1..L) the output of decoder layer i, before the
final norm (forward hooks, so the last layer is seen un-normalised, unlike `output_hidden_states`).
Linear inputs are recorded by forward pre-hooks registered after osp-eval's own, so they are what the Linear
really multiplies: after any online rotation (e.g. the down_proj Hadamard) and activation fake-quant.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import base_role, get_adapter
from .errors import OspEvalError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _out_tensor(out) -> torch.Tensor:
    # Decoder layers return a tensor in recent transformers, a tuple in older ones.
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def collect_outliers(model, windows: torch.Tensor, topk: int = 5, progress: bool = True) -> dict:
    """Run [nwindows, ntokens] token ids through `model` (each window one sequence) and record magnitudes.

    Returns plain lists plus `first_window_abs`: [L+1, ntokens, hidden] fp32 |residual| of window 0 (for plots).
    """
    ad = get_adapter(model)
    layers = ad.layers(model)
    nlayers, (nwin, ntok) = len(layers), windows.shape
    device = next(model.parameters()).device
    hidden = model.config.hidden_size
    chan_max = torch.zeros(nlayers + 1, hidden)  # max |x| per channel over every token seen
    tok_max = torch.zeros(nlayers + 1, nwin, ntok)  # max |x| per token over channels
    tok_chan = torch.zeros(nlayers + 1, nwin, ntok, dtype=torch.long)  # ...and the channel holding it
    first = torch.zeros(nlayers + 1, ntok, hidden)
    lin_max = {r: torch.zeros(nlayers) for r in ROLES}
    w = 0  # index of the window being run, read by the hooks

    def residual_hook(i):
        def hook(module, args, out):
            a = _out_tensor(out)[0].detach().float().abs().cpu()  # [ntokens, hidden], batch of 1
            chan_max[i] = torch.maximum(chan_max[i], a.amax(0))
            tok_max[i, w], tok_chan[i, w] = a.max(-1)
            if w == 0:
                first[i] = a
        return hook

    def linear_hook(i, role):
        def hook(module, args):
            lin_max[role][i] = max(lin_max[role][i].item(), args[0].detach().abs().max().float().item())
        return hook

    handles = [ad.embed(model).register_forward_hook(residual_hook(0))]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(residual_hook(i + 1)))
        for role, linear in ad.linears(layer).items():
            # experts fold into their dense role: the largest input any expert saw
            handles.append(linear.register_forward_pre_hook(linear_hook(i, base_role(role))))
    t0 = time.perf_counter()
    try:
        for w in tqdm(range(nwin), desc="outliers", disable=not progress, leave=False):
            getattr(model, "base_model", model)(input_ids=windows[w : w + 1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return summarize(chan_max, tok_max, tok_chan, first, lin_max, windows, topk) | {
        "seconds": time.perf_counter() - t0
    }


def summarize(chan_max, tok_max, tok_chan, first, lin_max, windows, topk: int = 5) -> dict:
    """Per residual index: max, top channels, top tokens; per decoder layer: the max input of each Linear."""
    residual = []
    for i in range(chan_max.shape[0]):
        cv, ci = chan_max[i].topk(min(topk, chan_max.shape[1]))
        tv, ti = tok_max[i].flatten().topk(min(topk, tok_max[i].numel()))
        ntok = tok_max.shape[2]
        residual.append({
            "index": i,
            "name": "embeddings" if i == 0 else f"layer {i} output",
            "max_abs": chan_max[i].max().item(),
            "median_abs_window0": first[i].median().item(),
            "top_channels": [{"channel": int(c), "max_abs": v.item()} for v, c in zip(cv, ci)],
            "top_tokens": [{"window": int(t) // ntok, "position": int(t) % ntok,
                            "token_id": int(windows.flatten()[t]), "channel": int(tok_chan[i].flatten()[t]),
                            "max_abs": v.item()} for v, t in zip(tv, ti)],
        })
    linear_inputs = [{"layer": i + 1, **{r: lin_max[r][i].item() for r in ROLES}} for i in range(len(lin_max["q"]))]
    return {"residual": residual, "linear_inputs": linear_inputs, "first_window_abs": first}


def _pool_max(a: torch.Tensor, max_bins: int) -> tuple[torch.Tensor, int]:
    """Max-pool the last dim into at most `max_bins` bins, so a single-channel spike survives the picture."""
    step = -(-a.shape[-1] // max_bins)
    if step == 1:
        return a, 1
    pad = (-a.shape[-1]) % step
    a = torch.nn.functional.pad(a, (0, pad))
    return a.view(*a.shape[:-1], -1, step).amax(-1), step


def plot_layers(result: dict, path: Path, title: str) -> Path:
    """(a) per-layer max |activation| (log y): residual stream and down_proj input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["residual"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["index"] for r in res], [r["max_abs"] for r in res], "o-", label="residual stream max |x|")
    ax.plot([r["index"] for r in res], [r["median_abs_window0"] for r in res], ":", color="gray",
            label="residual stream median |x| (window 0)")
    lin = result["linear_inputs"]
    ax.plot([r["layer"] for r in lin], [r["down"] for r in lin], "s-", label="down_proj input max |x|")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = embeddings; i = output of decoder layer i / input of its down_proj)")
    ax.set_ylabel("|activation|")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_layer_map(result: dict, layer: int, path: Path, title: str, tokens: list[str] | None = None) -> Path:
    """(b) |residual| of one layer over channels × tokens (window 0, log colour), and its per-channel max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    a = result["first_window_abs"][layer].T  # [hidden, ntokens]
    pooled, step = _pool_max(a.T.contiguous(), 256)  # pool channels, keep tokens
    pooled = pooled.T.clamp_min(1e-3).numpy()
    ntok, hidden = a.shape[1], a.shape[0]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(pooled, aspect="auto", origin="lower", interpolation="nearest", cmap="magma",
                   norm=LogNorm(vmin=max(pooled.min(), 1e-3), vmax=pooled.max()), extent=(0, ntok, 0, hidden))
    fig.colorbar(im, ax=ax, label="|activation|")
    ax.set_xlabel("token position (window 0)")
    ax.set_ylabel("channel" + (f" (max over bins of {step})" if step > 1 else ""))
    top = result["residual"][layer]["top_channels"][0]
    ax.set_title(f"{result['residual'][layer]['name']}: |x| (top channel over all windows: {top['channel']}, "
                 f"{top['max_abs']:.4g})", fontsize=10)
    if tokens is not None and len(tokens) <= 64:
        ax.set_xticks([i + 0.5 for i in range(len(tokens))], tokens, rotation=90, fontsize=6)
    per_channel = a.amax(1).numpy()
    bx.plot(range(hidden), per_channel, lw=0.8)
    bx.set_yscale("log")
    bx.set_xlabel("channel")
    bx.set_ylabel("max |x| over window 0")
    for c in result["residual"][layer]["top_channels"][:3]:
        bx.annotate(str(c["channel"]), (c["channel"], per_channel[c["channel"]]), fontsize=8, color="C3")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_outliers(model_name: str, cfg, *, layer=None, nwindows=4, ntokens=256, gguf_file=None, dtype="auto",
                 device=None, data_dir=None, ndocs=1000, output_dir="results", progress=True) -> dict:
    """Load (and optionally quantize) a model, record its outliers on C4 windows, write JSON and PNGs."""
    from .kurtosis import c4_kurtosis_text, token_rows
    from .models import load_config, resolve_model
    from .pipeline import load_and_quantize, method_name, model_slug, preflight
    from .provenance import now, text_sha256
    from .ppl import check_seqlen
    from .results import cell_key, save_result

    # Fail fast on bad flags and missing data, before loading the weights.
    config = load_config(*resolve_model(model_name, gguf_file))
    check_seqlen(config, ntokens)
    if layer is not None and not 0 <= layer <= config.num_hidden_layers:
        raise OspEvalError(f"--layer {layer}: this model has residual indices 0 (embeddings) to "
                           f"{config.num_hidden_layers}")
    text = c4_kurtosis_text(data_dir, ndocs)
    inputs = preflight(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device, data_dir=data_dir,
                       output_dir=output_dir)
    started = now()
    model, tok, info = load_and_quantize(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device,
                                         data_dir=data_dir, progress=progress, inputs=inputs)
    windows = token_rows(tok, text, nwindows, ntokens)
    res = collect_outliers(model, windows, progress=progress)
    if layer is None:  # default: the residual index with the largest activation
        layer = max(range(len(res["residual"])), key=lambda i: res["residual"][i]["max_abs"])
    for r in res["residual"]:
        for t in r["top_tokens"]:
            t["token"] = tok.decode([t["token_id"]])
    method = method_name(cfg)
    record = {
        "kind": "outliers",
        "dataset": f"C4 en validation, first {ndocs} documents + '\\n\\n': first {nwindows} windows of {ntokens}",
        "model": model_name,
        "gguf_file": gguf_file,
        "method": method,
        "config": cfg.to_dict(),
        "model_fingerprint": inputs.fingerprint,
        "data": {"sha256": text_sha256(text), "chars": len(text)},
        **info,
        "nwindows": nwindows,
        "ntokens": ntokens,
        "layer": layer,
        "seconds": res["seconds"],
        "residual": res["residual"],
        "linear_inputs": res["linear_inputs"],
    }
    key = cell_key(**inputs.identity("outliers", cfg), data=text_sha256(text), nwindows=nwindows, ntokens=ntokens,
                   ndocs=ndocs, dtype=info["dtype"])
    stem = f"{method}_{key}"
    out = Path(output_dir) / "outliers" / model_slug(model_name, gguf_file)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model_slug(model_name, gguf_file)} ({method}), C4 {nwindows}×{ntokens} tokens"
    tokens = [tok.decode([int(t)]) for t in windows[0]] if ntokens <= 64 else None
    record["plots"] = [str(plot_layers(res, out / f"{stem}_layers.png", title)),
                       str(plot_layer_map(res, layer, out / f"{stem}_layer{layer}.png", title, tokens))]
    record["result_path"] = str(save_result(record, out, stem, started=started))
    return record


def format_table(record: dict) -> str:
    lin = {r["layer"]: r for r in record["linear_inputs"]}
    lines = [f"{'residual':<18}{'max |x|':>11}{'top channel':>13}{'token (pos)':>22}{'down_proj in':>14}"]
    for r in record["residual"]:
        c, t = r["top_channels"][0], r["top_tokens"][0]
        down = f"{lin[r['index']]['down']:>14.4g}" if r["index"] in lin else f"{'':>14}"
        tok = f"{t['token']!r}"[:14] + f" ({t['position']})"
        lines.append(f"{r['name']:<18}{r['max_abs']:>11.4g}{c['channel']:>13}{tok:>22}{down}")
    return "\n".join(lines)


def _cli(args) -> None:
    from .cli_args import config_from_args

    cfg = config_from_args(args, default_method="rtn")
    r = run_outliers(args.model, cfg, layer=args.layer, nwindows=args.nwindows, ntokens=args.ntokens,
                     gguf_file=args.gguf_file, dtype=args.dtype, device=args.device, data_dir=args.data_dir,
                     output_dir=args.output_dir, progress=not args.no_progress)
    print(format_table(r))
    top = max(r["residual"], key=lambda x: x["max_abs"])
    print(f"{r['method']} {r['model']}: largest residual |x| = {top['max_abs']:.4g} in channel "
          f"{top['top_channels'][0]['channel']} at {top['name']}")
    print("plots: " + ", ".join(r["plots"]))
    print(f"result: {r['result_path']}")


def add_cli(subparsers) -> None:
    """Register `osp-eval outliers`."""
    from .cli_args import add_model_args, add_quant_args, positive_int

    p = subparsers.add_parser("outliers", help="largest activations per layer, top channels/tokens, plots")
    add_model_args(p)
    p.add_argument("--layer", type=int, default=None,
                   help="residual index for the channel × token map (0 = embeddings; default: the largest)")
    p.add_argument("--nwindows", type=positive_int, default=4, help="C4 windows, each one sequence")
    p.add_argument("--ntokens", type=positive_int, default=256, help="tokens per window")
    add_quant_args(p)
    p.set_defaults(func=_cli)
