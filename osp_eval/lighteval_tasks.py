"""The reference's eleven lighteval tasks (PROTOCOL.md §7), written on lighteval 0.13's public API.

Each task has a hub config pinned to the reference's dataset repo and revision, and a local source: the
files of an offline folder laid out like ../shared/data, converted to the HF field layout the prompt
functions expect (so one prompt function serves both routes).

Prompts and metrics follow the reference (lighteval 0.9.2 era):
- multiple choice: choices start with a space; the score is `acc_norm_nospace` (the best log-prob per
  character of the choice, not counting its leading space);
- gsm8k: quasi exact match after the GSM8K answer extractor (`#### N`) on prediction and gold;
- trivia_qa: quasi exact match of the normalised prediction against the normalised aliases.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from lighteval.metrics.metrics_sample import ExactMatches, LoglikelihoodAcc
from lighteval.metrics.normalizations import LogProbCharNorm, gsm8k_normalizer, harness_triviaqa_normalizer
from lighteval.metrics.utils.metric_utils import SampleLevelMetric
from lighteval.tasks.lighteval_task import LightevalTaskConfig
from lighteval.tasks.requests import Doc, SamplingMethod

from .errors import OspEvalError

# ---------------------------------------------------------------- metrics

ACC_NORM_NOSPACE = SampleLevelMetric(
    metric_name="acc_norm_nospace",
    sample_level_fn=LoglikelihoodAcc(logprob_normalization=LogProbCharNorm(ignore_first_space=True)),
    category=SamplingMethod.LOGPROBS,
    corpus_level_fn=np.mean,
    higher_is_better=True,
)
QEM_GSM8K = SampleLevelMetric(
    metric_name="qem",
    sample_level_fn=ExactMatches(strip_strings=True, normalize_gold=gsm8k_normalizer,
                                 normalize_pred=gsm8k_normalizer),
    category=SamplingMethod.GENERATIVE,
    corpus_level_fn=np.mean,
    higher_is_better=True,
)
# The golds are already normalised by the prompt function; only the prediction needs it.
QEM_TRIVIAQA = SampleLevelMetric(
    metric_name="qem",
    sample_level_fn=ExactMatches(strip_strings=True, normalize_pred=harness_triviaqa_normalizer),
    category=SamplingMethod.GENERATIVE,
    corpus_level_fn=np.mean,
    higher_is_better=True,
)

LETTERS = "ABCDE"

# ---------------------------------------------------------------- prompt functions (HF field layout in)


def arc_prompt(line: dict, task_name: str | None = None) -> Doc:
    return Doc(task_name=task_name, query=f"Question: {line['question']}\nAnswer:",
               choices=[f" {c}" for c in line["choices"]["text"]],
               gold_index=line["choices"]["label"].index(line["answerKey"]))


def commonsense_qa_prompt(line: dict, task_name: str | None = None) -> Doc:
    return Doc(task_name=task_name, query=line["question"], choices=[f" {c}" for c in line["choices"]["text"]],
               gold_index=line["choices"]["label"].index(line["answerKey"].strip()), instruction="")


def gsm8k_prompt(line: dict, task_name: str | None = None) -> Doc:
    return Doc(task_name=task_name, query=f"Question: {line['question']}\nAnswer:", choices=[f" {line['answer']}"],
               gold_index=0)


def _hellaswag_clean(text: str) -> str:
    # WikiHow artefacts, as the harness cleans them.
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_prompt(line: dict, task_name: str | None = None) -> Doc:
    ctx = f"{line['ctx_a']} {line['ctx_b'].capitalize()} "
    return Doc(task_name=task_name, query=_hellaswag_clean(f"{line['activity_label']}: {ctx}"),
               choices=[" " + _hellaswag_clean(e) for e in line["endings"]],
               gold_index=int(line["label"]) if line["label"] != "" else -1)


def mmlu_prompt(line: dict, task_name: str | None = None) -> Doc:
    topic = line["subject"].replace("_", " ")
    query = f"The following are questions about {topic}.\nQuestion: {line['question']}\nAnswer:"
    return Doc(task_name=task_name, query=query,
               choices=[f" {c}" for c in line["choices"]], gold_index=int(line["answer"]),
               instruction=f"The following are questions about {topic}.\n")


def openbookqa_prompt(line: dict, task_name: str | None = None) -> Doc:
    return Doc(task_name=task_name, query=line["question_stem"], choices=[f" {c}" for c in line["choices"]["text"]],
               gold_index=LETTERS.index(line["answerKey"].strip()))


def piqa_prompt(line: dict, task_name: str | None = None) -> Doc:
    return Doc(task_name=task_name, query=f"Question: {line['goal']}\nAnswer:",
               choices=[f" {line['sol1']}", f" {line['sol2']}"], gold_index=int(line["label"]))


def siqa_prompt(line: dict, task_name: str | None = None) -> Doc:
    return Doc(task_name=task_name, query=f"{line['context']} {line['question']}",
               choices=[f" {line[k]}" for k in ("answerA", "answerB", "answerC")],
               gold_index=int(line["label"]) - 1, instruction="")


def _drop_prefixed(aliases: list[str]) -> list[str]:
    # An alias whose prefix is already accepted adds nothing to an exact match on the prefix list.
    aliases = sorted(aliases)
    kept = [aliases[0]]
    for a in aliases[1:]:
        if not a.startswith(kept[-1]):
            kept.append(a)
    return kept


def triviaqa_prompt(line: dict, task_name: str | None = None) -> Doc:
    golds = [a.lower().translate(str.maketrans("", "", string.punctuation))
             for a in _drop_prefixed(list(line["answer"]["aliases"]))]
    return Doc(task_name=task_name, query=f"Question: {line['question']}\nAnswer:", choices=[golds], gold_index=0)


def winogrande_prompt(line: dict, task_name: str | None = None) -> Doc:
    query, rest = line["sentence"].split("_", 1)
    rest = rest.strip()
    return Doc(task_name=task_name, query=query, choices=[f"{line['option1']} {rest}", f"{line['option2']} {rest}"],
               gold_index=int(line["answer"]) - 1 if line["answer"] != "" else -1)


# ---------------------------------------------------------------- hub configs (the reference's pins)


def _mc(name, prompt, repo, subset, revision, split="validation", **kw) -> LightevalTaskConfig:
    return LightevalTaskConfig(name=name, prompt_function=prompt, hf_repo=repo, hf_subset=subset, hf_revision=revision,
                               metrics=[ACC_NORM_NOSPACE], evaluation_splits=[split], **kw)


TASKS: dict[str, LightevalTaskConfig] = {c.name: c for c in [
    _mc("arc:easy", arc_prompt, "allenai/ai2_arc", "ARC-Easy", "210d026faf9955653af8916fad021475a3f00453", "test"),
    _mc("arc:challenge", arc_prompt, "allenai/ai2_arc", "ARC-Challenge", "210d026faf9955653af8916fad021475a3f00453",
        "test"),
    _mc("commonsense_qa", commonsense_qa_prompt, "tau/commonsense_qa", "default",
        "94630fe30dad47192a8546eb75f094926d47e155"),
    LightevalTaskConfig(name="gsm8k", prompt_function=gsm8k_prompt, hf_repo="openai/gsm8k", hf_subset="main",
                        hf_revision="e53f048856ff4f594e959d75785d2c2d37b678ee", hf_avail_splits=["train", "test"],
                        evaluation_splits=["test"], few_shots_split="train",
                        few_shots_select="random_sampling_from_train", generation_size=256,
                        stop_sequence=["Question:", "Question"], metrics=[QEM_GSM8K]),
    _mc("hellaswag", hellaswag_prompt, "Rowan/hellaswag", "default", "6002345709e0801764318f06bf06ce1e7d1a1fe3"),
    _mc("mmlu", mmlu_prompt, "cais/mmlu", "all", "c30699e8356da336a370243923dbaf21066bb9fe", "test",
        hf_avail_splits=["dev", "test"], few_shots_split="dev", few_shots_select="sequential"),
    _mc("openbook_qa", openbookqa_prompt, "allenai/openbookqa", "main", "388097ea7776314e93a529163e0fea805b8a6454"),
    _mc("piqa", piqa_prompt, "ybisk/piqa", "plain_text", "2e8ac2dffd59bac8c3c6714948f4c551a0848bb0"),
    _mc("siqa", siqa_prompt, "lighteval/siqa", "default", "54c6a1f8cb6daf4f5abf24a601852612fb35eb25",
        hf_avail_splits=["train", "validation"]),
    LightevalTaskConfig(name="trivia_qa", prompt_function=triviaqa_prompt, hf_repo="mandarjoshi/trivia_qa",
                        hf_subset="rc.nocontext", hf_revision="0f7faf33a3908546c6fd5b73a660e0f8ff173c2f",
                        hf_avail_splits=["train", "validation"], evaluation_splits=["validation"],
                        few_shots_split="train", few_shots_select="random_sampling_from_train", generation_size=20,
                        stop_sequence=["Question:", "Question"], metrics=[QEM_TRIVIAQA]),
    _mc("winogrande", winogrande_prompt, "allenai/winogrande", "winogrande_xl",
        "85ac5b5a3b7a930e22d590176e39460400d19e41"),
]}

# The ten benchmarks of the OSP average: ARC easy and challenge are one benchmark, "arc", scored as the
# unweighted mean of the two accuracies (the reference README counts 10 benchmarks for its 11 lines).
BENCHMARK = {name: ("arc" if name.startswith("arc:") else name) for name in TASKS}
MAIN_METRIC = {name: c.metrics[0].metric_name for name, c in TASKS.items()}
FEWSHOT_SEED = 42  # lighteval 0.13 shuffles the docs and draws the shots with random.Random(42)

# ---------------------------------------------------------------- local files -> HF field layout


def _jsonl(path: Path) -> list[dict]:
    # Split on "\n" only: one TriviaQA record contains U+0085, a line break for str.splitlines().
    return [json.loads(s) for s in path.read_text(encoding="utf-8").split("\n") if s.strip()]


def _labels(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").split("\n") if s.strip()]


def _with_labels(rows: list[dict], labels: list[str], what: str) -> list[dict]:
    if len(rows) != len(labels):
        raise OspEvalError(f"{what}: {len(rows)} rows but {len(labels)} labels")
    return [{**r, "label": lab} for r, lab in zip(rows, labels)]


def _csqa(d: Path) -> dict:
    rows = []
    for r in _jsonl(d / "commonsense_qa/dev_rand_split.jsonl"):
        q = r["question"]
        rows.append({"id": r["id"], "question": q["stem"], "question_concept": q["question_concept"],
                     "choices": {"label": [c["label"] for c in q["choices"]],
                                 "text": [c["text"] for c in q["choices"]]},
                     "answerKey": r["answerKey"]})
    return {"validation": rows}


def _mmlu_split(d: Path, split: str) -> list[dict]:
    files = sorted((d / "mmlu" / split).glob(f"*_{split}.csv"))  # HF "all" = subjects in alphabetical order
    if not files:
        raise FileNotFoundError(2, "No such file", str(d / "mmlu" / split / f"<subject>_{split}.csv"))
    rows = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        with open(f, newline="", encoding="utf-8") as fh:  # no header: question, A, B, C, D, answer letter
            for q, a, b, c, dd, ans in csv.reader(fh):
                rows.append({"question": q, "subject": subject, "choices": [a, b, c, dd], "answer": "ABCD".index(ans)})
    return rows


def _mmlu(d: Path) -> dict:
    return {"test": _mmlu_split(d, "test"), "dev": _mmlu_split(d, "dev")}


def _hellaswag(d: Path) -> dict:
    # Lossy source: 6 lines per item ("activity_label: ctx", label, 4 endings), ctx_a/ctx_b merged and
    # the bracket markers already removed. ctx_b stays empty, so the prompt is "label: ctx ".
    lines = bz2.open(d / "fallback_not_exact/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().split("\n")
    lines = lines[: len(lines) // 6 * 6]
    rows = []
    for i in range(0, len(lines), 6):
        label, _, ctx = lines[i].partition(": ")
        rows.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": lines[i + 2: i + 6],
                     "label": lines[i + 1].strip()})
    return {"validation": rows}


TRIVIAQA_SHOT_POOL = 500  # the local subsample has no train split: its last 500 questions are the shot pool


def _triviaqa(d: Path) -> dict:
    rows = []
    for r in _jsonl(d / "fallback_not_exact/triviaqa_sm_sub.jsonl"):
        q = r["context"].removeprefix("Question:").strip().removesuffix("Answer:").strip()
        rows.append({"question": q, "answer": {"value": r["answer"], "aliases": list(r["aliases"])}})
    return {"validation": rows[:-TRIVIAQA_SHOT_POOL], "train": rows[-TRIVIAQA_SHOT_POOL:]}


LOCAL_FORMAT = 1  # bump when a converter's output changes: converted folders are reused per (format, files)


@dataclass(frozen=True)
class LocalSource:
    files: tuple[str, ...]  # relative to the data folder, for the error message
    read: Callable[[Path], dict]  # data folder -> {split: rows in the HF field layout}
    not_exact: str | None = None  # why the numbers are not comparable with the reference, if they are not


LOCAL: dict[str, LocalSource] = {
    "arc:easy": LocalSource(("ai2_arc/ARC-Easy-test.jsonl",),
                            lambda d: {"test": _jsonl(d / "ai2_arc/ARC-Easy-test.jsonl")}),
    "arc:challenge": LocalSource(("ai2_arc/ARC-Challenge-test.jsonl",),
                                 lambda d: {"test": _jsonl(d / "ai2_arc/ARC-Challenge-test.jsonl")}),
    "commonsense_qa": LocalSource(("commonsense_qa/dev_rand_split.jsonl",), _csqa),
    "gsm8k": LocalSource(("gsm8k/test.jsonl", "gsm8k/train.jsonl"),
                         lambda d: {"test": _jsonl(d / "gsm8k/test.jsonl"), "train": _jsonl(d / "gsm8k/train.jsonl")}),
    "hellaswag": LocalSource(("fallback_not_exact/hellaswag_val_full.txt.bz2",), _hellaswag,
                             "lossy HellaSwag copy (ctx_a/ctx_b merged, markers stripped by its source)"),
    "mmlu": LocalSource(("mmlu/test/<subject>_test.csv", "mmlu/dev/<subject>_dev.csv"), _mmlu),
    "openbook_qa": LocalSource(("openbookqa/main-test.jsonl",),
                               lambda d: {"test": _jsonl(d / "openbookqa/main-test.jsonl")},
                               "OpenBookQA test split; the reference scores validation"),
    "piqa": LocalSource(("piqa/valid.jsonl", "piqa/valid-labels.lst"),
                        lambda d: {"validation": _with_labels(_jsonl(d / "piqa/valid.jsonl"),
                                                              [int(x) for x in _labels(d / "piqa/valid-labels.lst")],
                                                              "piqa")}),
    "siqa": LocalSource(("siqa/dev.jsonl", "siqa/dev-labels.lst"),
                        lambda d: {"validation": _with_labels(_jsonl(d / "siqa/dev.jsonl"),
                                                              _labels(d / "siqa/dev-labels.lst"), "siqa")}),
    "trivia_qa": LocalSource(("fallback_not_exact/triviaqa_sm_sub.jsonl",), _triviaqa,
                             f"3000-question TriviaQA subsample, not rc.nocontext validation; shots from its last "
                             f"{TRIVIAQA_SHOT_POOL} questions"),
    "winogrande": LocalSource(("winogrande/winogrande_xl-validation.jsonl",),
                              lambda d: {"validation": _jsonl(d / "winogrande/winogrande_xl-validation.jsonl")}),
}


class MissingData(OspEvalError):
    """A task's local files are absent: the runner skips the task and lists it in the summary."""


def folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def write_local(name: str, data_dir: Path, out_dir: Path) -> Path:
    """Convert the task's local files into `out_dir/<task>/`: one JSONL per split and a README.md with YAML
    `configs:`, which is how `datasets.load_dataset(<folder>)` finds the splits."""
    src = LOCAL[name]
    try:
        splits = src.read(data_dir)
    except FileNotFoundError as e:
        raise MissingData(f"local data not found under {data_dir} (expected {', '.join(src.files)}; "
                          f"missing {e.filename})") from e
    folder = out_dir / folder_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    yaml = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")
        yaml += [f"  - split: {split}", f"    path: {split}.jsonl"]
    (folder / "README.md").write_text("\n".join(yaml + ["---", ""]), encoding="utf-8")
    return folder


def local_config(name: str, folder: Path) -> LightevalTaskConfig:
    """The hub config pointed at a folder made by `write_local` (evaluation and shot splits as available)."""
    splits = sorted(p.stem for p in folder.glob("*.jsonl"))
    cfg = TASKS[name]
    eval_split = cfg.evaluation_splits[0] if cfg.evaluation_splits[0] in splits else splits[0]
    shots = cfg.few_shots_split if cfg.few_shots_split in splits else None
    return dataclasses.replace(cfg, hf_repo=str(folder), hf_subset="default", hf_revision=None,
                               hf_avail_splits=splits, evaluation_splits=[eval_split], few_shots_split=shots)
