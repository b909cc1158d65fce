"""``get_rope_index`` equals the original Qwen2.5-VL algorithm (transformers 4.x, ported below), equals HF 5.x
for text and images, and deviates from HF 5.19 after a video exactly as the module docstring says."""
import pytest
import torch

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl import get_rope_index
from megatron_tr1.demo import TINY_SPECIAL_TOKENS
from megatron_tr1.demo import tiny_hf_model

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


def _reference(config, ids, mask, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None):
    """The loop of transformers 4.x ``Qwen2_5_VLForConditionalGeneration.get_rope_index`` (4.x fills padding
    with 1, never attended; here 0 as ours)."""
    merge, tokens_per_second = config.vision_config.spatial_merge_size, config.vision_config.tokens_per_second
    positions = torch.zeros(3, *ids.shape, dtype=torch.long)
    image_index = video_index = 0
    for b in range(ids.shape[0]):
        tokens = ids[b][mask[b].bool()].tolist()
        remain_images, remain_videos = _runs(tokens, IMAGE), _runs(tokens, VIDEO)
        llm_pos_ids_list, st = [], 0
        for _ in range(remain_images + remain_videos):
            ed_image = tokens.index(IMAGE, st) if remain_images > 0 else len(tokens) + 1
            ed_video = tokens.index(VIDEO, st) if remain_videos > 0 else len(tokens) + 1
            if ed_image < ed_video:
                (t, h, w), second_per_grid_t = image_grid_thw[image_index].tolist(), 0
                image_index, remain_images, ed = image_index + 1, remain_images - 1, ed_image
            else:
                t, h, w = video_grid_thw[video_index].tolist()
                second_per_grid_t = second_per_grid_ts[video_index] if second_per_grid_ts is not None else 1.0
                video_index, remain_videos, ed = video_index + 1, remain_videos - 1, ed_video
            llm_grid_t, llm_grid_h, llm_grid_w = t, h // merge, w // merge
            text_len = ed - st
            st_idx = llm_pos_ids_list[-1].max() + 1 if len(llm_pos_ids_list) > 0 else 0
            llm_pos_ids_list.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)
            range_tensor = torch.arange(llm_grid_t).view(-1, 1).expand(-1, llm_grid_h * llm_grid_w)
            t_index = (range_tensor * second_per_grid_t * tokens_per_second).long().flatten()
            h_index = torch.arange(llm_grid_h).view(1, -1, 1).expand(llm_grid_t, -1, llm_grid_w).flatten()
            w_index = torch.arange(llm_grid_w).view(1, 1, -1).expand(llm_grid_t, llm_grid_h, -1).flatten()
            llm_pos_ids_list.append(torch.stack([t_index, h_index, w_index]) + text_len + st_idx)
            st = ed + llm_grid_t * llm_grid_h * llm_grid_w
        if st < len(tokens):
            st_idx = llm_pos_ids_list[-1].max() + 1 if len(llm_pos_ids_list) > 0 else 0
            llm_pos_ids_list.append(torch.arange(len(tokens) - st).view(1, -1).expand(3, -1) + st_idx)
        positions[:, b, mask[b].bool()] = torch.cat(llm_pos_ids_list, dim=1)
    return positions


def _runs(tokens, pad):
    """Vision blocks of ``pad`` in ``tokens`` (4.x counts the tokens right after ``<|vision_start|>``)."""
    return sum(1 for a, b in zip(tokens, tokens[1:]) if a == START and b == pad)


@pytest.mark.parametrize("left", [True, False])
def test_mixed_batch_with_padding_equals_original(hf, left):
    # row 0: text, video (2x4x6 merged, 1.0 s/grid), text, image (1x2x3), text
    # row 1: short text, video (3x2x2 merged, 0.75 s/grid: temporal ids run past the spatial ones), text
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
    assert torch.equal(ours, _reference(hf.config, ids, mask, **grids))
    # the positions are really 3-D: temporal ids jump by tokens_per_second * seconds (2 * 0.75 -> 1, 3)
    t_ids = ours[0, 1][ids[1] == VIDEO].unique()
    assert t_ids.tolist() == [2, 3, 5]
    assert ours[:, 1, ids[1] == END].tolist() == [[6]] * 3  # the text after the video continues at max + 1


def test_without_seconds_per_grid_equals_original(hf):
    ids, mask = _pad([_row([30, 31], (VIDEO, 12), [32])], left=True)
    grid = dict(video_grid_thw=torch.tensor([[3, 4, 4]]))
    assert torch.equal(get_rope_index(hf.config, ids, mask, **grid), _reference(hf.config, ids, mask, **grid))


@pytest.mark.parametrize("left", [True, False])
def test_text_and_images_equal_hf(hf, left):
    w = list(range(20, 40))
    rows = [_row(w[:3], (IMAGE, 6), w[3:8], (IMAGE, 12), w[8:10]), _row((IMAGE, 6), w[:2]), w[:7]]
    ids, mask = _pad(rows, left)
    grids = dict(image_grid_thw=torch.tensor([[1, 4, 6], [1, 6, 8], [1, 2, 12]]))
    assert torch.equal(get_rope_index(hf.config, ids, mask, **grids), _hf(hf, ids, mask, **grids))
    ids, mask = _pad([w[:9], w[:4]], left)
    assert torch.equal(get_rope_index(hf.config, ids, mask), _hf(hf, ids, mask))


@pytest.mark.parametrize("grid, seconds, offset", [
    ((2, 8, 12), 4.0, 3),  # the tiny test video at 0.5 fps
    ((30, 32, 32), 1.0, 43),  # 30 s at 2 fps, 448x448 with Qwen2.5-VL's 14-pixel patches
])
def test_text_after_video_is_lower_in_hf_5(hf, grid, seconds, offset):
    """Pins transformers 5.19's deviation (see the module docstring): after a video HF restarts the text at
    ``start + max(h, w) // merge`` instead of the video's max position + 1. Fails once HF changes it."""
    merge = hf.config.vision_config.spatial_merge_size
    n = grid[0] * grid[1] * grid[2] // merge ** 2
    ids, mask = _pad([_row([30, 31], (VIDEO, n), [32, 33, 34])], left=True)
    grids = dict(video_grid_thw=torch.tensor([grid]), second_per_grid_ts=torch.tensor([seconds]))
    ours, theirs = get_rope_index(hf.config, ids, mask, **grids)[:, 0], _hf(hf, ids, mask, **grids)[:, 0]
    start, end = 3, 3 + n  # the video's first pad token and <|vision_end|>
    assert torch.equal(ours[:, :end], theirs[:, :end])
    expected = int(ours[:, start:end].max()) + 1 - (start + max(grid[1], grid[2]) // merge)
    assert expected == offset
    assert (ours[:, end:] - theirs[:, end:] == expected).all()


def test_pad_count_not_matching_grid_is_a_clear_error(hf):
    ids, mask = _pad([_row([30], (VIDEO, 10), [31])], left=True)
    with pytest.raises(ConfigError, match="video_grid_thw: grid \\[3, 4, 4\\] needs 12"):
        get_rope_index(hf.config, ids, mask, video_grid_thw=torch.tensor([[3, 4, 4]]))
    with pytest.raises(ConfigError, match="more vision runs"):
        get_rope_index(hf.config, ids, mask)
