import pytest

from megatron_tr1.errors import ConfigError
from megatron_tr1.rl.config import StageConfig
from megatron_tr1.rl.sampler import PromptSampler, shard


def test_epochs_are_permutations_and_cross_over():
    s = PromptSampler(5, seed=3)
    first = s.take(3) + s.take(3)
    assert sorted(first[:5]) == list(range(5)) and s.position == (1, 1)
    assert first[:5] == s.order(0) and first[5] == s.order(1)[0]
    assert s.order(0) != s.order(1)  # each epoch reshuffles (fixed for seed 3)
    assert PromptSampler(5, shuffle=False).take(7) == [0, 1, 2, 3, 4, 0, 1]


def test_resume_from_position_draws_the_same_prompts():
    straight = PromptSampler(7, seed=1)
    batches = [straight.take(3) for _ in range(5)]
    stopped = PromptSampler(7, seed=1)
    stopped.take(3), stopped.take(3)
    resumed = PromptSampler(7, seed=1, epoch=stopped.position[0], index=stopped.position[1])
    assert [resumed.take(3) for _ in range(3)] == batches[2:]
    with pytest.raises(ConfigError, match=r"data position \(epoch 0, index 9\) is outside 7 samples"):
        PromptSampler(7, index=9)


def test_shard_and_stage_steps():
    assert shard(list(range(8)), rank=1, world=4) == [2, 3]
    with pytest.raises(ConfigError, match="multiple of 3"):
        shard(list(range(8)), rank=0, world=3)
    assert StageConfig(episodes=15).total_steps(num_samples=100, samples_per_step=16) == 94
    with pytest.raises(ConfigError, match="steps=7 and episodes=15 are both set"):
        StageConfig(steps=7, episodes=15)
