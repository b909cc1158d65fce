"""The SFT step: the loss mask covers exactly the answer tokens and <|im_end|>; the loss and gradient do not depend
on the micro-batch split; a few steps on one sample lower the loss (tiny model, fp32, one gloo rank)."""
import math

from megatron_tr1.rl.batching import format_seconds
from megatron_tr1.launch import run_ranks

from tests.rl import _step_cases


def test_sft_mask_and_loss_decrease():
    out = run_ranks(_step_cases.sft_case, 1)[0]
    for masked, expected, first, prompt_len, text, gt in zip(out["masked"], out["expected"], out["first_masked"],
                                                            out["prompt_lengths"], out["texts"], out["gts"]):
        assert masked == expected and first == prompt_len - 1  # the response tokens, nothing of the prompt
        assert text.startswith("<think>") and text.endswith("</answer><|im_end|>")
        assert f'"start_time": "{format_seconds(gt[0])}", "end_time": "{format_seconds(gt[1])}"' in text
    one, two = out["split"]  # micro-batches of 1 and of 2 sequences
    assert abs(one["loss"] - two["loss"]) < 1e-5 and abs(one["grad_norm"] - two["grad_norm"]) < 1e-5
    assert one["tokens"] == two["tokens"] == sum(len(m) for m in out["masked"])
    losses = [m["loss"] for m in out["metrics"]]
    assert all(math.isfinite(x) for x in losses) and all(m["grad_norm"] > 0 for m in out["metrics"])
    assert losses[5] < losses[0] - 0.5, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 4, losses  # mostly monotone
