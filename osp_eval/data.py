"""Text data: WikiText-2 (PPL and calibration), C4 (calibration, kurtosis), local files or the hub.

Local layout (as in the shared data folder): `DATA_DIR/wikitext-2-raw-v1/{test,train,validation}.jsonl`,
`DATA_DIR/c4/c4-en-validation-*.jsonl`. DATA_DIR comes from `--data_dir` or `$OSP_EVAL_DATA`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .errors import OspEvalError

WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
C4_HUB = ("allenai/c4", "en/c4-validation.00000-of-00008.json.gz")
DATA_ENV = "OSP_EVAL_DATA"


def data_dir(explicit: str | None = None) -> Path | None:
    d = explicit or os.environ.get(DATA_ENV)
    if d is None:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        raise OspEvalError(f"data folder not found: {d}")
    return p


def read_jsonl(path: Path, field: str = "text") -> list[str]:
    """The `field` of every JSON line. Malformed input is a one-line error naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise OspEvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise OspEvalError(f"cannot read {path}: {e.strerror or e}") from e
    rows = []
    # Split on "\n" only: some records contain U+0085, which str.splitlines() would break on.
    for i, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise OspEvalError(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise OspEvalError(f"{path}:{i}: expected an object with a string {field!r} field, like "
                               f'{{"{field}": "..."}}')
        rows.append(obj[field])
    return rows


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def _wikitext2(split: str, data_dir_: str | None) -> tuple[list[str], Path | None]:
    d = data_dir(data_dir_)
    if d is not None:
        for p in (d / "wikitext-2-raw-v1" / f"{split}.jsonl", d / f"{split}.jsonl"):
            if p.is_file():
                return read_jsonl(p), p
        raise OspEvalError(
            f"WikiText-2 {split} split not found under {d}: expected {d}/wikitext-2-raw-v1/{split}.jsonl "
            '(one {"text": row} per line, rows in the order of the HF dataset)'
        )
    return _hub_rows(WIKITEXT_HUB[0], WIKITEXT_HUB[1], split, f"WikiText-2 {split}"), None


def wikitext2_rows(split: str = "test", data_dir_: str | None = None) -> list[str]:
    return _wikitext2(split, data_dir_)[0]


def wikitext2_data(split: str = "test", data_dir_: str | None = None) -> tuple[str, dict]:
    """(text, fingerprint) of a WikiText-2 split: the text as `wikitext2_text`, and what it was read from — the
    file's path and sha256, the rows, the text's sha256, and whether it is the reference test split."""
    from .provenance import WIKITEXT2_TEST_SHA256, file_record, text_sha256

    rows, path = _wikitext2(split, data_dir_)
    text = "\n\n".join(rows)
    sha = text_sha256(text)
    info = {"dataset": f"wikitext-2-raw-v1 {split}", "file": file_record(path) if path else None,
            "hub": None if path else f"{WIKITEXT_HUB[0]} ({WIKITEXT_HUB[1]})", "rows": len(rows), "chars": len(text),
            "sha256": sha, "is_reference_split": sha == WIKITEXT2_TEST_SHA256 if split == "test" else None}
    return text, info


def _hub_rows(repo: str, name: str | None, split: str, what: str, **kw) -> list[str]:
    hint = (f"{what} is not available offline: pass --data_dir DIR (or set ${DATA_ENV}) pointing at a folder "
            "laid out like ../shared/data")
    if _offline():
        raise OspEvalError(hint)
    try:
        import datasets

        return list(datasets.load_dataset(repo, name, split=split, **kw)["text"])
    except Exception as e:  # network/hub failures: say what to do instead of a traceback
        raise OspEvalError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def wikitext2_text(split: str = "test", data_dir_: str | None = None) -> str:
    """The reference's PPL text: the split's rows joined with blank lines."""
    return "\n\n".join(wikitext2_rows(split, data_dir_))


def c4_docs(data_dir_: str | None = None, n: int | None = None) -> list[str]:
    d = data_dir(data_dir_)
    if d is not None:
        files = sorted((d / "c4").glob("c4-en-validation-*.jsonl")) if (d / "c4").is_dir() else []
        if not files:
            raise OspEvalError(f"C4 validation sample not found: expected {d}/c4/c4-en-validation-*.jsonl")
        docs = read_jsonl(files[0])
    else:
        docs = _hub_rows("allenai/c4", None, "validation", "C4 validation", data_files={"validation": C4_HUB[1]})
    return docs[:n] if n else docs


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, with no BOS/EOS (the reference sets add_bos_token=False)."""
    return torch.tensor(_encode(tokenizer, text, add_special_tokens=False), dtype=torch.long)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    from transformers.utils import logging

    # Whole-corpus encoding: the "longer than model_max_length" warning does not apply.
    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    finally:
        logging.set_verbosity(previous)


def calibration_text(source: str, data_dir_: str | None = None) -> tuple[str, str]:
    """(text, description) of a calibration source; raises before any model is loaded when it is missing."""
    if source == "wikitext2":
        try:
            return wikitext2_text("train", data_dir_), "WikiText-2 raw train"
        except OspEvalError as e:
            raise OspEvalError(f"{e} — GPTQ/SpinQuant calibration offline: pass --calib_data c4 (the C4 sample in "
                               "../shared/data/c4/) or --calib_data PATH") from e
    if source == "c4":
        return " ".join(c4_docs(data_dir_)), "C4 en validation sample (documents joined with spaces)"
    p = Path(source)
    if not p.is_file():
        raise OspEvalError(f"--calib_data {source!r}: use wikitext2, c4 or a path to a .jsonl/.txt file")
    if p.suffix == ".jsonl":
        text = "\n\n".join(read_jsonl(p))
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise OspEvalError(f"--calib_data {p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise OspEvalError(f"--calib_data {p} is empty")
    return text, f"file {p.resolve()}"


def calibration_ids(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0, data_dir_: str | None = None,
    text: tuple[str, str] | None = None,
) -> tuple[torch.Tensor, dict]:
    """`nsamples` random windows of `seqlen` tokens, sampled as the reference (random.seed, randint).

    `text` may pass an already fetched `calibration_text(...)`.
    Returns ([nsamples, seqlen] ids, a description of the source for the results file).
    """
    from .provenance import text_sha256

    text, desc = text or calibration_text(source, data_dir_)
    # The reference tokenises WikiText-2 train with its default BOS; other sources get no special tokens.
    ids = torch.tensor(_encode(tokenizer, text, source == "wikitext2"), dtype=torch.long)
    n = ids.numel()
    if n <= seqlen + 1:
        raise OspEvalError(f"calibration text has {n} tokens, too few for windows of {seqlen}")
    if nsamples > (n - seqlen - 1) and nsamples > n // seqlen:
        raise OspEvalError(f"--nsamples {nsamples} windows of {seqlen} tokens need more text than the {n} tokens "
                           "of the calibration data: lower --nsamples or --calib_seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    windows = torch.stack([ids[i : i + seqlen] for i in starts])
    return windows, {"source": desc, "sha256": text_sha256(text), "tokens_available": n, "nsamples": nsamples,
                     "seqlen": seqlen, "seed": seed}
