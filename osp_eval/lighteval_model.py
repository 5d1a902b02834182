"""lighteval's TransformersModel around an in-memory osp-eval model (`OspLightevalModel`).

Imported lazily by `lighteval_run.run_lighteval`: importing lighteval takes ~10 s, and `--help` or a bad
argument should not wait.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from lighteval.models.model_output import ModelResponse
from lighteval.models.transformers.transformers_model import TransformersModel, TransformersModelConfig
from tqdm.auto import tqdm

from .errors import OspEvalError
from . import parallel
from .lighteval_run import DEFAULT_BATCH


def _digest(obj) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def plan_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Positions 0..n-1 of rows sorted longest first (`lengths`: tokens each) cut into consecutive batches of at
    most `budget` tokens counted as rows x the batch's longest row (always at least one row)."""
    out, pos = [], 0
    while pos < len(lengths):
        n = max(1, budget // max(lengths[pos], 1))
        out.append(list(range(pos, min(pos + n, len(lengths)))))
        pos += n
    return out


class OspModelConfig(TransformersModelConfig):
    """`model_name` is a label (it names lighteval's output folders); `tokenizer` is the model folder,
    `model_loading_kwargs["gguf_file"]` the GGUF file inside it, if any."""

    def get_model_sha(self):
        return ""  # an in-memory, modified model has no hub revision (and no network call for it)


class OspLightevalModel(TransformersModel):
    """lighteval's TransformersModel around our in-memory model, with two changes:

    - the tokenizer comes from osp_eval's loader (GGUF too), left-padded as lighteval's own;
    - log-likelihoods: one row per (doc, choice), all rows sorted by length, longest first, and packed
      into forward passes of at most `batch_size` x `max_length` tokens (so `batch_size` rows of full
      length, and many more short ones: short multiple-choice rows keep a GPU as busy as long ones).
      Rows are right-padded (causal, so padding never reaches a real position; every row starts at
      position 0). Only the positions that predict continuation tokens go through lm_head, and only
      each row's own ones through an fp32 log-softmax. On CUDA OOM the token budget halves (for the rest
      of the run: the batch is cut in pieces).
    - data parallel (osp_eval.parallel): each rank scores whole batches of the plan, or generates whole
      generation batches, and the results are merged on every rank before the responses are built.
      Context and continuation are tokenized together and split (lighteval's
      `pairwise_tokenization=False`, as the reference's 0.9 did); lighteval 0.13's own loop always
      tokenizes them separately.
    """

    show_progress = True

    @property
    def disable_tqdm(self) -> bool:
        return not self.show_progress

    def _create_auto_tokenizer(self):
        from .models import load_tokenizer

        tok = load_tokenizer(self.config.tokenizer, self.config.model_loading_kwargs.get("gguf_file"))
        tok.padding_side = "left"
        tok.truncation_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.model_max_length = self.max_length
        return tok

    def _loglikelihood_tokens(self, docs, rolling=False):
        if rolling:
            raise NotImplementedError("perplexity tasks are not supported here: use `osp-eval ppl`")
        rows, first = [], []  # rows: (doc index, choice index, context, continuation); first: doc's 1st row
        for i, doc in enumerate(docs):
            first.append(len(rows))
            ctx = self.prompt_manager.prepare_prompt(doc)
            ctx_toks, cont_toks = self.tok_encode_pair(ctx, doc.choices, pairwise=self.pairwise_tokenization)
            rows += [(i, j, list(c), list(t)) for j, (c, t) in enumerate(zip(ctx_toks, cont_toks))]
        order = sorted(range(len(rows)), key=lambda k: -(len(rows[k][2]) + len(rows[k][3])))
        budget = (self.config.batch_size or DEFAULT_BATCH) * self.max_length  # tokens per forward pass
        # The batches are planned over all rows, then dealt out whole (round-robin: each rank gets long and short
        # ones): every row meets the same neighbours and padding at any world size, so its numbers do not change.
        batches = plan_batches([self._row_len(rows[k]) for k in order], budget)
        mine = [[order[p] for p in batches[b]] for b in parallel.shard(len(batches))]
        scores = {}
        bar = tqdm(total=sum(map(len, mine)), desc="loglikelihood", unit="seq", disable=self.disable_tqdm)
        room = budget  # tokens per pass this rank can afford; halves on each CUDA OOM
        for batch in mine:
            pos = 0
            while pos < len(batch):
                longest = self._row_len(rows[batch[pos]])
                piece = [rows[k] for k in batch[pos: pos + max(1, room // longest)]]
                try:
                    out = self._score_rows(piece)
                except torch.cuda.OutOfMemoryError:
                    if len(piece) == 1:
                        raise
                    room = len(piece) * longest // 2
                    torch.cuda.empty_cache()
                    continue
                for (i, j, _, _), r in zip(piece, out):
                    scores[i, j] = r
                pos += len(piece)
                bar.update(len(piece))
        bar.close()
        scores = parallel.gather(scores, agree=_digest(rows))
        responses = []
        for i, doc in enumerate(docs):
            per = [scores[i, j] for j in range(len(doc.choices))]
            responses.append(ModelResponse(
                logprobs=[p[0] for p in per], argmax_logits_eq_gold=[p[1] for p in per],
                input_tokens=rows[first[i]][2],
                output_tokens=[rows[first[i] + j][3] for j in range(len(doc.choices))],
                truncated_tokens_count=max(p[2] for p in per)))
        return responses

    def _row_len(self, row) -> int:
        """Tokens a row feeds the model: context + continuation, less the last (only a target), at most max_length."""
        return max(1, min(len(row[2]) + len(row[3]) - 1, self.max_length))

    vllm_engine = None  # set by run_lighteval(backend="vllm"): generation in vLLM
    vllm_loglik = True  # and log-likelihoods too (False: the Transformers model scores them)
    gen_batch_size = None  # prompts per HF generate() call (None: batch_size)

    def greedy_until(self, docs):
        """Generative tasks: lighteval's padded HF loop, or vLLM's scheduler when an engine is set.

        The vLLM branch keeps lighteval's choices for the Transformers path: the prompt is kept whole up to
        max_length tokens (cut from the left beyond), the generation gets what room is left (at least one
        token), stops at EOS or a stop string, and its decoded text is cut at the first stop string. (The
        HF loop sizes the room per padded batch, by its longest prompt; here each document gets its own.)

        Data parallel (HF loop only: run_lighteval refuses vLLM there for now): the HF loop's batches
        (lighteval's own grouping and order) are dealt out whole, so each prompt is generated with the same
        neighbours as in one process."""
        if parallel.world().size == 1 or self.vllm_engine is not None:
            return self._greedy_until_local(docs)
        units = self._generation_batches(docs)
        mine = {}
        for u in parallel.shard(len(units)):
            mine |= dict(zip(units[u], self._greedy_until_local([docs[k] for k in units[u]])))
        merged = parallel.gather(mine, agree=_digest([d.query for d in docs]))
        return [merged[k] for k in range(len(docs))]

    def _generation_batches(self, docs) -> list[list[int]]:
        """The documents (indices) of each generate() call lighteval's padded loop makes for `docs`."""
        from lighteval.data import GenerativeTaskDataset

        data = GenerativeTaskDataset(requests=list(docs), num_dataset_splits=self.DATASET_SPLITS)
        size = self.gen_batch_size or self.config.batch_size or DEFAULT_BATCH
        return [data.original_order[p: min(p + size, end)] for start, end in data.splits
                for p in range(start, end, size)]

    def _greedy_until_local(self, docs):
        if self.vllm_engine is None:
            # lighteval's loop batches by config.batch_size: swap in the generation batch for this call.
            old = self.config.batch_size
            self.config.batch_size = self.gen_batch_size or old
            try:
                return super().greedy_until(docs)
            finally:
                self.config.batch_size = old
        from .vllm_backend import generate_vllm

        prompts, budgets, stops, cut = [], [], [], []
        for doc in docs:
            if (doc.num_samples or 1) > 1:
                raise OspEvalError("sampling several generations per document is not supported with vLLM")
            ids = self.tokenizer(self.prompt_manager.prepare_prompt(doc),
                                 add_special_tokens=self.add_special_tokens)["input_ids"]
            cut.append(max(0, len(ids) - self.max_length))
            ids = ids[-self.max_length:]
            want = doc.generation_size or self.max_length - len(ids)
            prompts.append(ids)
            budgets.append(max(1, min(want, self.max_length - len(ids))))
            stops.append([self.tokenizer.eos_token, *(doc.stop_sequences or [])])
        outs = generate_vllm(self.vllm_engine, prompts, budgets, stops)
        responses = []
        for ids, gen, st, c in zip(prompts, outs, stops, cut):
            text = self.tok_decode([gen])[0]
            for term in st:
                text = text.split(term)[0]
            responses.append(ModelResponse(text=[text], output_tokens=[gen], input_tokens=ids,
                                           truncated_tokens_count=c, padded_tokens_count=0))
        return responses

    @torch.no_grad()
    def _score_rows(self, batch):
        """[(logprob sum, greedy == continuation, tokens cut)] for rows of (i, j, context, continuation)."""
        if self.vllm_engine is not None and self.vllm_loglik:
            from .vllm_backend import score_rows_vllm

            return score_rows_vllm(self.vllm_engine, batch, self.max_length)
        seqs, conts, cut = [], [], []
        for _, _, ctx, cont in batch:
            whole = ctx + cont
            seq = whole[-(self.max_length + 1):][:-1]  # the last token is only a target
            cont = cont[-len(seq):] if len(cont) > len(seq) else cont
            seqs.append(seq)
            conts.append(cont)
            cut.append(max(0, len(whole) - 1 - len(seq)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
        lo = min(len(s) - len(c) for s, c in zip(seqs, conts))
        hi = max(len(s) for s in seqs)
        keep = torch.arange(lo, hi, device=self.device)
        logits = self.model(input_ids=ids.to(self.device), logits_to_keep=keep).logits
        out = []
        for r, (s, c) in enumerate(zip(seqs, conts)):
            start = len(s) - len(c) - lo
            logp = F.log_softmax(logits[r, start: start + len(c)].float(), dim=-1)
            target = torch.tensor(c, device=logp.device)
            total = logp.gather(-1, target[:, None]).sum().item()
            out.append((total, bool((logp.argmax(-1) == target).all()), cut[r]))
        return out
