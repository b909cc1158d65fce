"""``get_rope_index`` equals HF's full-forward ``Qwen2_5_VLModel.get_rope_index`` (transformers 5.x)."""
import pytest
import torch

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl import get_rope_index
from megatron_tr1.testing import TINY_SPECIAL_TOKENS
from megatron_tr1.testing.tiny_model import tiny_hf_model

START, END = TINY_SPECIAL_TOKENS["<|vision_start|>"], TINY_SPECIAL_TOKENS["<|vision_end|>"]
IMAGE, VIDEO = TINY_SPECIAL_TOKENS["<|image_pad|>"], TINY_SPECIAL_TOKENS["<|video_pad|>"]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(0, num_hidden_layers=1, vision_depth=1)


def _row(*parts):
    out = []
    for p in parts:
        out += p if isinstance(p, list) else [START] + [p[0]] * p[1] + [END]
    return out


def _pad(rows, left):
    n = max(map(len, rows))
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def _hf(hf, ids, mask, **grids):
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    return hf.model.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, **grids)[0]


@pytest.mark.parametrize("left", [True, False])
def test_mixed_batch_with_padding_equals_hf(hf, left):
    # row 0: text, video (2x4x6 merged, 1.0 s/grid), text, image (1x2x3), text
    # row 1: short text, video (3x2x2 merged, 0.5 s/grid, odd multiple of tokens_per_second), text
    # row 2: text only (padding with no vision at all)
    w = list(range(20, 40))
    rows = [_row(w[:3], (VIDEO, 48), w[3:8], (IMAGE, 6), w[8:10]),
            _row(w[:1], (VIDEO, 12), w[1:4]),
            w[:7]]
    ids, mask = _pad(rows, left)
    grids = dict(video_grid_thw=torch.tensor([[2, 8, 12], [3, 4, 4]]), image_grid_thw=torch.tensor([[1, 4, 6]]),
                 second_per_grid_ts=torch.tensor([1.0, 0.75]))
    ours = get_rope_index(hf.config, ids, mask, **grids)
    assert ours.shape == (3, 3, ids.shape[1])
    assert torch.equal(ours, _hf(hf, ids, mask, **grids))
    # the positions are really 3-D: temporal ids jump by tokens_per_second * seconds (2 * 0.75 -> 1, 3)
    t_ids = ours[0, 1][ids[1] == VIDEO].unique()
    assert t_ids.tolist() == [2, 3, 5]


def test_without_seconds_per_grid_equals_hf(hf):
    ids, mask = _pad([_row([30, 31], (VIDEO, 12), [32])], left=True)
    grid = dict(video_grid_thw=torch.tensor([[3, 4, 4]]))
    assert torch.equal(get_rope_index(hf.config, ids, mask, **grid), _hf(hf, ids, mask, **grid))


def test_pad_count_not_matching_grid_is_a_clear_error(hf):
    ids, mask = _pad([_row([30], (VIDEO, 10), [31])], left=True)
    with pytest.raises(ConfigError, match="video_grid_thw: grid \\[3, 4, 4\\] needs 12"):
        get_rope_index(hf.config, ids, mask, video_grid_thw=torch.tensor([[3, 4, 4]]))
    with pytest.raises(ConfigError, match="more vision runs"):
        get_rope_index(hf.config, ids, mask)
