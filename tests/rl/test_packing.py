"""Padding-free micro-batches (``optim.packing``): a micro-batch packed into one row gives the padded batch's
per-token log-probs, entropies, SFT and GRPO losses and every gradient (1e-5 relative) at TP1, TP2 and PP2, on two
videos with responses of 7 and 45 tokens and on text alone; a GRPO step and an SFT step reach the same weights; the
model computes no padded slot."""
import numpy as np
import pytest
import torch

from megatron_tr1.launch import run_ranks

from tests.rl import _packing_cases as cases

RTOL = 1e-5


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_packed_equals_padded(tp, pp):
    results = run_ranks(cases.packed_vs_padded_case, tp * pp, tp, pp, timeout=600)
    last = results[-1]
    for key in ("lp", "ent", "sft", "grpo"):
        assert last[key] < RTOL, (key, last[key])
    for r in results:
        assert r["grads"] > 10 and r["grad"] < RTOL, r["grad"]
        padded, packed = r["slots"]
        assert packed < padded  # the padded batch computed the short sequence's padding too


def test_packed_text_equals_padded():
    """Without video: the decoder alone, packed vs padded, sequences of 7 and 31 tokens."""
    (diff,) = run_ranks(text_case, 1, timeout=300)
    assert diff < RTOL


def text_case(rank, world):
    from megatron_tr1.demo import tiny_hf_model
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.models.qwen2_5_vl import get_rope_index
    from megatron_tr1.rl.batching import TokenSequence, pack_batch, pad_batch, unpack
    from megatron_tr1.testing.tiny_model import tiny_mcore_model

    init_parallel(1, 1)
    hf = tiny_hf_model(0)
    model = tiny_mcore_model(hf)
    g = torch.Generator().manual_seed(3)
    seqs = [TokenSequence(torch.randint(16, 500, (3,), generator=g).tolist(),
                          torch.randint(16, 500, (n,), generator=g).tolist()) for n in (4, 28)]
    padded, packed = pad_batch(seqs, 0), pack_batch(seqs)
    pos = get_rope_index(hf.config, padded["input_ids"], attention_mask=padded["attention_mask"])
    packed_pos = torch.cat([get_rope_index(hf.config, torch.tensor([s.prompt_ids + s.response_ids]))[:, 0]
                            for s in seqs], dim=1)[:, None]
    with torch.no_grad():
        a = model.forward_logprobs(padded["input_ids"], pos, padded["labels"], attention_mask=padded["attention_mask"])
        b = model.forward_logprobs(packed["input_ids"], packed_pos, packed["labels"], cu_seqlens=packed["cu_seqlens"])
    b = unpack(b, packed["cu_seqlens"], a.shape[1])
    mask = padded["loss_mask"]
    return ((a - b)[mask].abs().max() / a[mask].abs().max()).item()


def test_grpo_and_sft_steps_reach_the_same_weights():
    (padded,) = run_ranks(cases.step_case, 1, False, timeout=600)
    (packed,) = run_ranks(cases.step_case, 1, True, timeout=600)
    for stage in ("grpo", "sft"):  # relative to each tensor's largest weight
        worst = max(np.abs(padded[stage][k] - packed[stage][k]).max() / np.abs(padded[stage][k]).max()
                    for k in padded[stage])
        assert worst < RTOL, (stage, worst)
    assert packed["metrics"]["batch/pad_fraction"] == 0.0 <= padded["metrics"]["batch/pad_fraction"]
    assert packed["sft_metrics"]["batch/pad_fraction"] == 0.0
    assert packed["metrics"]["batch/tokens"] == padded["metrics"]["batch/tokens"]


def test_a_micro_batch_is_packed_only_when_padding_would_waste_enough(monkeypatch):
    """``optim.packing_min_saving``: near-equal lengths stay padded (packing's gathers would cost more than the
    padding), a spread packs; 0 packs everything; ``optim.packing=false`` nothing."""
    from megatron_tr1.rl import update
    from megatron_tr1.rl.batching import TokenSequence
    from megatron_tr1.rl.config import TrainConfig

    calls = []
    monkeypatch.setattr(update, "model_batch", lambda seqs, prompts, hf, pad, packed: calls.append(packed) or {})
    seqs = [TokenSequence([1] * 10, [2] * n) for n in (10, 9, 30, 2)]  # wastes 1/40 = 2.5%, then 28/80 = 35%
    assert update.padding_share([20, 19]) == pytest.approx(0.025) and update.padding_share([40, 12]) == 0.35
    cfg = TrainConfig()
    cfg.optim.micro_batch_size = 2
    for saving, packing, want in ((0.05, True, [False, True]), (0.0, True, [True, True]), (0.0, False, [False] * 2)):
        cfg.optim.packing_min_saving, cfg.optim.packing, calls[:] = saving, packing, []
        update.micro_batches(seqs, [None] * 4, [0, 1, 2, 3], cfg, None, 0)
        assert calls == want, (saving, packing)
