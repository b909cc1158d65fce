import math

import pytest
import torch

from megatron_tr1.errors import ConfigError
from megatron_tr1.rl.advantages import (DynamicSampler, group_advantages, group_spread, kl_penalized_rewards,
                                        overlong_keep)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2 (n=4): [3, 1, 2, 2], mean 2, std sqrt(2/3)
    adv = group_advantages(rewards, n=4, eps=0.0)
    s1, s2 = 0.5 / math.sqrt(1 / 3), 1 / math.sqrt(2 / 3)
    torch.testing.assert_close(adv, torch.tensor([s1, -s1, -s1, s1, s2, -s2, 0.0, 0.0]))
    no_std = group_advantages(rewards, n=4, norm_by_std=False)
    torch.testing.assert_close(no_std, torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]))
    # eps is added to the std
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0]), n=2, eps=0.5),
                               torch.tensor([1 / (math.sqrt(2) + 0.5), -1 / (math.sqrt(2) + 0.5)]))


def test_equal_rewards_give_exact_zeros():
    # in float64 the mean of [0.1] * 3 is not 0.1: without the explicit zero this would be ~-1e-11, not 0
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64), n=3)
    assert adv.tolist() == [0.0] * 6
    assert group_spread(torch.tensor([0.1, 0.1, 0.0, 1.0]), n=2).tolist() == [0.0, 1.0]


def test_group_shape_errors():
    with pytest.raises(ConfigError, match="n >= 2"):
        group_advantages(torch.ones(4), n=1)
    with pytest.raises(ValueError, match="multiple of n=4"):
        group_advantages(torch.ones(6), n=4)


def test_kl_in_reward_subtracts_masked_sum():
    rewards = torch.tensor([1.0, 0.5])
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(kl_penalized_rewards(rewards, kl, mask, beta=0.5), torch.tensor([0.85, 0.35]))


def test_overlong_keep_masks_only_truncated_responses():
    keep = overlong_keep([[5, 6, 7, 8], [5, 6, 7, 2], [5, 2], [5, 6, 7, 8, 9], [9]], stop_token_id=2, max_tokens=4)
    assert keep.tolist() == [False, True, True, False, True]


def test_dynamic_sampling_refills_from_next_batch():
    ds = DynamicSampler(target=3, max_tries=3)
    assert not ds.add(["a", "b", "c"], torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]))
    assert ds.add(["d", "e", "f"], torch.tensor([0.5, 0.5, 0.0, 1.0, 1.0, 0.2]))
    assert ds.take() == ["a", "e", "f"]
    assert ds.stats() == {"dynamic_sampling/tries": 2, "dynamic_sampling/dropped": 3,
                          "dynamic_sampling/filled": 0, "dynamic_sampling/surplus": 0}
    with pytest.raises(RuntimeError, match="after done"):
        ds.add(["g"], torch.tensor([0.0, 1.0]))


def test_dynamic_sampling_tops_up_with_dropped_groups_after_max_tries():
    ds = DynamicSampler(target=3, max_tries=2)
    ds.add(["a", "b", "c"], torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]))
    with pytest.raises(RuntimeError, match="before done"):
        ds.take()
    assert ds.add(["d", "e", "f"], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.3, 0.3]))
    assert ds.take() == ["b", "a", "c"]
    assert ds.stats()["dynamic_sampling/dropped"] == 5 and ds.stats()["dynamic_sampling/filled"] == 2


def test_dynamic_sampling_counts_surplus():
    ds = DynamicSampler(target=2, max_tries=4)
    assert ds.add(["a", "b", "c"], torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]))
    assert ds.take() == ["a", "b"] and ds.stats()["dynamic_sampling/surplus"] == 1
    with pytest.raises(ConfigError, match="max_sampling_tries"):
        DynamicSampler(target=2, max_tries=0)
