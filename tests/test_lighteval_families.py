"""The lighteval model (OspLightevalModel) on every supported family: its batched, right-padded, length-sorted
log-likelihood rows equal log-probs computed directly, one unpadded sequence at a time, on the same W4A4KV4
QuaRot model (so padding, `logits_to_keep` and each family's attention/soft-capping/scaling survive the batching)."""

import pytest
import torch
import torch.nn.functional as F

import test_families
import test_moe
from osp_eval import preset, quantize_

pytest.importorskip("lighteval")

FAMILIES = [(test_families, f) for f in test_families.FAMILIES] + [(test_moe, f) for f in test_moe.MOE]


def _direct(model, ctx, cont):
    seq = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=seq, use_cache=False).logits[0].float(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
    target = torch.tensor(cont)
    return logp[pos, target].sum().item(), bool((logp[pos].argmax(-1) == target).all())


@pytest.mark.parametrize("builder, family", FAMILIES, ids=[f for _, f in FAMILIES])
def test_lighteval_rows_equal_direct_logprobs(builder, family, stories_path, tmp_path):
    from osp_eval.lighteval_model import OspLightevalModel, OspModelConfig

    model = builder.build(family, dtype=torch.float32)
    quantize_(model, preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", w_clip=False,
                            rotate=True), progress=False)
    mcfg = OspModelConfig(model_name=family, tokenizer=stories_path, model_loading_kwargs={"gguf_file": None},
                          batch_size=4, max_length=64, device="cpu", override_chat_template=False,
                          cache_dir=str(tmp_path))
    lm = OspLightevalModel.from_model(model, mcfg)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (n_ctx, n_cont) in enumerate([(40, 3), (7, 1), (23, 5), (2, 2), (31, 4)]):
        ctx = torch.randint(1, 256, (n_ctx,), generator=g).tolist()
        cont = torch.randint(1, 256, (n_cont,), generator=g).tolist()
        rows.append((i, 0, ctx, cont))
    scored = lm._score_rows(rows)  # one padded batch of unequal rows
    for (_, _, ctx, cont), (total, greedy, cut) in zip(rows, scored):
        want, want_greedy = _direct(model, ctx, cont)
        assert cut == 0 and greedy == want_greedy
        assert abs(total - want) < 1e-4 * max(1.0, abs(want)), (family, total, want)
