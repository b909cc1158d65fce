"""Qwen3-VL ``get_rope_index`` equals transformers 5.19's ``Qwen3VLModel.get_rope_index`` (called unbound on a tiny
config) and vLLM 0.32's ``Qwen3VLForConditionalGeneration._get_mrope_input_positions`` (a static method: no engine)
on the same tokens: text only, one video of several timestamped frames, rows left- and right-padded, images with
videos. With each frame a grid of t = 1, HF's ``+= max(h, w) // merge`` and vLLM's ``max + 1`` agree, so nothing is
pinned as a difference (see the module docstring)."""
import importlib.util
from types import SimpleNamespace as NS

import pytest
import torch
from transformers import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

from megatron_tr1.demo import TINY_SPECIAL_TOKENS
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen3_vl.rope_index import get_rope_index

START, END = TINY_SPECIAL_TOKENS["<|vision_start|>"], TINY_SPECIAL_TOKENS["<|vision_end|>"]
IMAGE, VIDEO = TINY_SPECIAL_TOKENS["<|image_pad|>"], TINY_SPECIAL_TOKENS["<|video_pad|>"]
MERGE = 2


def tiny_qwen3_vl_config() -> Qwen3VLConfig:
    """A small Qwen3-VL config with the tiny tokenizer's special token ids (only ids and merge size matter here)."""
    return Qwen3VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


CONFIG = tiny_qwen3_vl_config()


class _HF:
    """What ``Qwen3VLModel.get_rope_index`` reads of its module: ``config`` and ``get_vision_position_ids``."""

    config = CONFIG
    get_vision_position_ids = Qwen3VLModel.get_vision_position_ids
    get_rope_index = Qwen3VLModel.get_rope_index


def _hf(ids, mask, **grids):
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()  # what Qwen3VLProcessor returns as mm_token_type_ids
    return _HF().get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, **grids)


def _stamp(i):
    """Stand-in token ids of a ``<t seconds>`` text (lengths vary, as real timestamps' do)."""
    return [40 + i, 50, 51] + [52] * (i % 2)


def _video(grid):
    """A Qwen3-VL video as the processor writes it: the template's outer start, per frame a timestamp and
    start + pads + end, the template's outer end."""
    t, h, w = grid
    out = [START]
    for i in range(t):
        out += _stamp(i) + [START] + [VIDEO] * (h * w // MERGE ** 2) + [END]
    return out + [END]


def _image(grid):
    return [START] + [IMAGE] * (grid[1] * grid[2] // MERGE ** 2) + [END]


def _pad(rows, left):
    n = max(map(len, rows))
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


W = list(range(20, 40))
VIDEO_A, VIDEO_B, IMAGE_A = [3, 4, 6], [2, 8, 4], [1, 6, 10]  # (t, h, w) in patches; B is taller than wide
CASES = {
    "text only": ([W[:9], W[:4]], {}),
    "one video": ([W[:5] + _video(VIDEO_A) + W[5:9]], dict(video_grid_thw=torch.tensor([VIDEO_A]))),
    "two video rows": ([W[:3] + _video(VIDEO_A) + W[3:5], W[:1] + _video(VIDEO_B) + W[1:8]],
                       dict(video_grid_thw=torch.tensor([VIDEO_A, VIDEO_B]))),
    "image and video": ([W[:2] + _image(IMAGE_A) + W[2:4] + _video(VIDEO_B) + W[4:6], W[:2] + _video(VIDEO_A) + W[2:3]],
                        dict(image_grid_thw=torch.tensor([IMAGE_A]), video_grid_thw=torch.tensor([VIDEO_B, VIDEO_A]))),
}


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_transformers(case, left):
    rows, grids = CASES[case]
    ids, mask = _pad(rows, left)
    ours = get_rope_index(CONFIG, ids, mask, **grids)
    theirs, _ = _hf(ids, mask, **grids)
    assert ours.dtype == torch.long and ours.shape == (3, len(rows), ids.shape[1])
    assert torch.equal(ours, theirs)
    assert torch.equal(get_rope_index(CONFIG, ids[:1], mask[:1], **_first_row_grids(case, grids)),
                       ours[:, :1])  # a row alone, as the packed trainer batch computes it


def _first_row_grids(case, grids):
    if case == "two video rows":
        return dict(video_grid_thw=grids["video_grid_thw"][:1])
    if case == "image and video":
        return dict(image_grid_thw=grids["image_grid_thw"], video_grid_thw=grids["video_grid_thw"][:1])
    return grids


def test_one_video_positions_by_hand():
    """Each frame is a block at the current position (t id = start, h/w ids start + row/col over the 2x3 merged
    grid); the text after it continues at start + max(2, 3), the block's max + 1."""
    ids = torch.tensor([[30, 31] + _video([2, 4, 6]) + [32]])
    pos = get_rope_index(CONFIG, ids, video_grid_thw=torch.tensor([[2, 4, 6]]))[:, 0]
    first = 2 + 1 + len(_stamp(0)) + 1  # text, outer start, timestamp, frame start
    assert pos[:, first - 1].tolist() == [first - 1] * 3  # the frame's <|vision_start|> is text
    block = pos[:, first:first + 6]
    assert block.tolist() == [[first] * 6, [first] * 3 + [first + 1] * 3, [first, first + 1, first + 2] * 2]
    assert pos[:, first + 6].tolist() == [first + 3] * 3  # <|vision_end|> at start + max(h, w)
    assert (pos[:, -1] == pos[:, -2] + 1).all() and pos.max() == pos[:, -1].max()


def test_pad_count_and_grid_count_errors():
    ids = torch.tensor([[30] + _video([2, 4, 6]) + [31]])
    with pytest.raises(ConfigError, match=r"video_grid_thw: more vision blocks .* than the grids give"):
        get_rope_index(CONFIG, ids, video_grid_thw=torch.tensor([[1, 4, 6]]))
    with pytest.raises(ConfigError, match=r"a block of grid \[1, 4, 8\] needs 8 consecutive pad tokens"):
        get_rope_index(CONFIG, ids, video_grid_thw=torch.tensor([[2, 4, 8]]))


# ---- vLLM 0.32 ----

vllm_missing = importlib.util.find_spec("vllm") is None


def _vllm_positions(tokens, grids):
    """vLLM's own positions for one prompt: ``mm_features`` as its processor places them (an image at its first
    pad token; a video at its first timestamp, just after the template's outer ``<|vision_start|>``)."""
    from megatron_tr1.torchvision_cpu import allow_torchvision_without_ops

    allow_torchvision_without_ops()
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    features, at = [], 0
    for modality, grid in grids:
        at = tokens.index(IMAGE, at) if modality == "image" else tokens.index(START, at) + 1
        features.append(NS(modality=modality, mm_position=NS(offset=at),
                           data={f"{modality}_grid_thw": NS(data=torch.tensor(grid))}))
        for _ in range(grid[0] if modality == "video" else 1):  # past the block's (each frame's) <|vision_end|>
            at = tokens.index(END, at) + 1
    return Qwen3VLForConditionalGeneration._get_mrope_input_positions(tokens, features, CONFIG)


@pytest.mark.skipif(vllm_missing, reason="vLLM not installed (README 'Rollouts on CPU')")
@pytest.mark.parametrize("parts", [
    [W[:9]],
    [W[:5], ("video", VIDEO_A), W[5:9]],
    [W[:2], ("image", IMAGE_A), W[2:4], ("video", VIDEO_B), W[4:6]],
    [("video", VIDEO_B), W[:3], ("video", [1, 4, 4]), W[3:5]],
], ids=["text only", "one video", "image and video", "two videos"])
def test_equals_vllm(parts):
    tokens, grids = [], []
    for p in parts:
        if isinstance(p, tuple):
            tokens += _video(p[1]) if p[0] == "video" else _image(p[1])
            grids.append(p)
        else:
            tokens += p
    theirs, delta = _vllm_positions(tokens, grids)
    kwargs = {f"{m}_grid_thw": torch.tensor([g for mm, g in grids if mm == m]) for m in ("image", "video")
              if any(mm == m for mm, _ in grids)}
    ours = get_rope_index(CONFIG, torch.tensor([tokens]), **kwargs)[:, 0]
    assert torch.equal(ours, theirs.long())
    assert int(ours.max()) + 1 - len(tokens) == delta  # where generation continues: the same
