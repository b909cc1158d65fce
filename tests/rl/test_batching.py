import pytest

from megatron_tr1.errors import ConfigError
from megatron_tr1.rewards import parse_answer, tvg_reward, tvg_reward_no_think
from megatron_tr1.rl.batching import (IGNORE_INDEX, TokenSequence, pad_batch, place_response,
                                      sequence_tensors, sft_sequence, sft_target, split_by_count, split_by_tokens)

STOP = 2
X = IGNORE_INDEX


def test_labels_are_next_tokens_on_the_response_only():
    t = sequence_tensors(TokenSequence([10, 11, 12], [20, 21, STOP]))
    assert t["input_ids"].tolist() == [10, 11, 12, 20, 21, STOP]
    assert t["labels"].tolist() == [X, X, 20, 21, STOP, X]
    assert t["loss_mask"].tolist() == [False, False, True, True, True, False]
    # per-response-token values land where the labels are
    assert place_response([0.5, 0.25, 0.125], 3, 6).tolist() == [0, 0, 0.5, 0.25, 0.125, 0]
    with pytest.raises(ValueError, match="do not fit"):
        place_response([1.0] * 4, 3, 6)
    with pytest.raises(ValueError, match="non-empty prompt and response"):
        TokenSequence([1], [])


def test_pad_batch_right_pads_to_multiple():
    b = pad_batch([TokenSequence([10, 11, 12], [20, 21, STOP]), TokenSequence([13], [22, 23, 24])], pad_id=0,
                  pad_multiple=4)
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21, STOP, 0, 0], [13, 22, 23, 24, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[X, X, 20, 21, STOP, X, X, X], [22, 23, 24, X, X, X, X, X]]
    assert b["attention_mask"].sum(1).tolist() == [6, 4]
    assert b["lengths"].tolist() == [6, 4] and b["prompt_lengths"].tolist() == [3, 1]
    assert b["loss_mask"].sum().item() == 6


def test_split_by_tokens_first_fit_decreasing():
    lengths = [5, 3, 8, 2, 6]
    assert split_by_tokens(lengths, max_tokens=10) == [[2, 3], [1, 4], [0]]
    assert split_by_tokens(lengths, max_tokens=10, max_seqs=1) == [[2], [4], [0], [1], [3]]
    assert split_by_tokens(lengths, max_tokens=24) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ConfigError, match=r"sequence 2 has 8 tokens, more than optim.max_tokens_per_micro_batch=7"):
        split_by_tokens(lengths, max_tokens=7)
    assert split_by_count(5, 2) == [[0, 1], [2, 3], [4]]


def test_sft_targets_score_full_format_and_accuracy():
    think = sft_target(1.234, 5.6)
    assert think.endswith('<answer>{"start_time": "1.23", "end_time": "5.60"}</answer>')
    assert think == ("<think>The event begins at about 1.23 seconds and ends at about 5.60 seconds.</think>"
                     '<answer>{"start_time": "1.23", "end_time": "5.60"}</answer>')
    r = tvg_reward(think, (1.234, 5.6), 10.0)
    assert r["format"] == 1.0 and r["accuracy"] > 0.998
    plain = sft_target(1.234, 5.6, think=False, decimals=1)
    assert plain == '<answer>{"start_time": "1.2", "end_time": "5.6"}</answer>'
    assert tvg_reward_no_think(plain, (1.2, 5.6), 10.0) == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}
    assert tvg_reward(plain, (1.2, 5.6), 10.0)["format"] == 0.0  # the think format needs the think block
    assert parse_answer(plain) == (1.2, 5.6)
    with pytest.raises(ConfigError, match="1 or 2 decimals"):
        sft_target(1.0, 2.0, decimals=3)


def test_sft_sequence_loss_covers_target_and_stop_only():
    def tokenizer(text, add_special_tokens):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}

    target = sft_target(0.5, 1.5, think=False)
    seq = sft_sequence(tokenizer, [1, 3, 7, 7, 4], target, STOP)
    t = sequence_tensors(seq)
    learned = t["labels"][t["loss_mask"]].tolist()
    assert "".join(map(chr, learned[:-1])) == target and learned[-1] == STOP
