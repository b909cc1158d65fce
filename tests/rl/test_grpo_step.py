"""One GRPO step end to end on the tiny model (fp32, one gloo rank, HF engine): rollouts, rewards, old / ref
log-probs, grpo_loss through megatron-core's schedule, optimizer step (megatron DDP + DistributedOptimizer, and
torch AdamW), weight sync.

Log-prob tolerance 1e-5 between the engine's sampled-token log-probs and the trainer's (fp32 CPU).
"""
import math

from megatron_tr1.launch import run_ranks

from tests.rl import _step_cases

LOGPROB_ATOL = 1e-5
TIMES = ("time/rollout", "time/reward", "time/logprob", "time/update", "time/sync")
METRICS = ("reward/mean", "reward/std", "reward/format", "reward/accuracy", "response_length/mean", "kl",
           "clip_frac", "entropy", "grad_norm", "tokens_per_s", "logprob_mismatch/mean", "logprob_mismatch/max",
           "loss") + TIMES


def test_grpo_step():
    out = run_ranks(_step_cases.grpo_case, 1)[0]
    first, second, flat = out["first"], out["second"], out["third"]
    for m in (first, second, out["kl_reward"], flat):
        assert all(math.isfinite(m[k]) for k in METRICS), m
        assert all(m[k] > 0 for k in TIMES)
    # the engine samples with the trainer's log-probs, before the update and again after update + sync
    assert first["logprob_mismatch/max"] < LOGPROB_ATOL and second["logprob_mismatch/max"] < LOGPROB_ATOL
    assert first["reward/std"] > 0 and first["advantages/abs_mean"] > 0.1 and first["grad_norm"] > 0
    assert out["change"] > 1e-4 and first["updates"] == 1 and first["invalid_responses"] < 8
    assert first["clip_frac"] == 0.0 and first["kl"] == 0.0  # on-policy, policy == reference at step 0
    assert second["kl"] > 0  # the policy moved away from the reference
    kl_reward = out["kl_reward"]  # KL in the reward instead of the loss
    assert kl_reward["reward/kl_penalty"] > 0 and kl_reward["kl"] == 0.0
    assert kl_reward["logprob_mismatch/max"] < LOGPROB_ATOL
    # all-equal rewards: every group dropped by dynamic sampling (2 tries), zero advantages, zero gradient
    assert flat["reward/zero_spread_groups"] == 1.0 and flat["advantages/abs_mean"] == 0.0
    assert flat["dynamic_sampling/tries"] == 2 and flat["dynamic_sampling/filled"] == 2
    assert flat["grad_norm"] == 0.0 and out["flat_grad"] == 0.0 and out["flat_change"] == 0.0
    # that policy is the reference twin, the engine still holds the trained one: the mismatch shows it
    assert flat["logprob_mismatch/max"] > 1e-2


def test_old_logprobs_from_the_update_forward_equal_a_separate_pass():
    out = run_ranks(_step_cases.old_from_update_case, 1)[0]
    assert out["passes"] == (1, 2)  # reference only, vs old policy + reference
    shortcut, separate = out["metrics"]
    assert out["moved"] > 1e-4 and out["param_diff"] < 1e-6, out  # the same update
    for key in ("loss", "grad_norm", "kl", "entropy", "reward/mean", "logprob_mismatch/max"):
        assert abs(shortcut[key] - separate[key]) < 1e-6, key
    assert shortcut["logprob_mismatch/max"] < LOGPROB_ATOL and shortcut["clip_frac"] == 0.0


def test_tis_moves_the_policy_less_when_the_engine_is_stale():
    out = run_ranks(_step_cases.stale_engine_case, 1)[0]
    plain, tis = out["none"], out["tis"]
    assert 1.0 < plain["metrics"]["logprob_mismatch/mean"] < 2.5, plain["metrics"]  # the engine is off
    assert tis["metrics"]["logprob_mismatch/mean"] == plain["metrics"]["logprob_mismatch/mean"]  # same rollouts
    assert tis["metrics"]["rc_weight_mean"] < 0.75 and tis["metrics"]["rc_masked_frac"] == 0.0
    assert "rc_weight_mean" not in plain["metrics"]
    assert 0 < tis["change"] < 0.92 * plain["change"], (tis["change"], plain["change"])


def test_sampled_video_placeholder_is_left_out():
    """A response holding a sampled <|video_pad|> is padded and dropped from the loss; others pass unchanged."""
    from megatron_tr1.rl.grpo import training_sequence
    from megatron_tr1.demo import tiny_hf_config

    config = tiny_hf_config()
    seq, ok = training_sequence([301, 302], [307, 308], config, pad_id=0)
    assert ok and seq.response_ids == [307, 308]
    seq, ok = training_sequence([301, 302], [307, config.video_token_id, 308], config, pad_id=0)
    assert not ok and seq.prompt_ids == [301, 302] and seq.response_ids == [0, 0, 0]
