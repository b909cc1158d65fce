"""The embedded demo's model folder: a tiny Qwen2.5-VL-architecture model and its tokenizer, built locally.

``tr1 train`` without ``model.hf_dir`` writes ``write_demo_model_dir(model.tiny, RUN/model_init)``: an HF folder
(config, random weights, this tokenizer, the processor configs) that then goes through the same ``model.hf_dir``
path as a real checkpoint. ``tiny_hf_config`` / ``tiny_hf_model`` are also the tiny models ``tr1 selftest``,
the benchmarks' CPU runs and the tests use.

**Tokenizer.** Byte-level BPE (``tokenizers``) with a 512-token vocabulary trained on a built-in corpus of
Temporal-R1 queries and answers. The Qwen2.5-VL special tokens sit at ``TINY_SPECIAL_TOKENS``' ids (0..7), eos
is ``<|im_end|>``, pad is ``<|endoftext|>``, and the chat template is Qwen2.5-VL's own, so prompts have the real
shape. Byte-level means any text decodes back exactly. Two choices keep the demo's sequences short (its CPU
budget is set by tokens per step): the fixed phrases of the task (``PHRASES``: the system prompts, the query
template around the caption, the answer's tags and JSON keys) are single tokens, as a domain tokenizer's merges
would make them; and digits are split one per token, as Qwen2's tokenizer does, so a time is spelled digit by
digit. A demo prompt is ~50 tokens, not ~170.

**Model.** The sizes keep every feature of the real architecture active: GQA, M-RoPE with three sections,
window attention in the vision tower with one full-attention block, and a 2x2 patch merger.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_tr1.data.prompt import QUERY_TEMPLATE, SYSTEM_PROMPT_NO_THINK, SYSTEM_PROMPT_THINK

# The tokenizer puts the Qwen2.5-VL special tokens at these ids, and the tiny model configs use the same ids.
TINY_SPECIAL_TOKENS = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<|vision_start|>": 3,
    "<|vision_end|>": 4,
    "<|vision_pad|>": 5,
    "<|image_pad|>": 6,
    "<|video_pad|>": 7,
}
VOCAB_SIZE = 512

# Qwen/Qwen2.5-VL-*-Instruct chat_template.json, verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

_EVENTS = [
    "a person opens the door", "the person closes a cabinet", "someone is cooking on the stove",
    "a man sits down on a chair", "the woman drinks a glass of water", "person puts a book on the table",
    "someone turns off the light", "a person is laughing at the phone", "the boy throws a pillow",
    "person takes off their shoes", "a girl runs across the room", "the dog jumps over the fence",
    "person washes the dishes in the sink", "someone starts sneezing", "a person holds a broom and sweeps the floor",
    "the man walks through the doorway", "she eats a sandwich", "person is tidying up the shelf",
    "someone pours coffee into a cup", "a person watches television on the sofa", "the player kicks the ball",
    "a woman plays the guitar", "the child rides a bicycle", "person puts on a jacket", "someone reads a newspaper",
]


_QUERY_PREFIX, _QUERY_SUFFIX = QUERY_TEMPLATE.split("{query}")
# whole-phrase tokens (non-special added tokens: matched before BPE, decoded verbatim)
PHRASES = (
    SYSTEM_PROMPT_THINK, SYSTEM_PROMPT_NO_THINK, "You are a helpful assistant.", _QUERY_PREFIX, _QUERY_SUFFIX,
    "<think>", "</think>", "<answer>", "</answer>", '{"start_time": "', '", "end_time": "', '"}',
)


def _corpus() -> list[str]:
    from megatron_tr1.data.synthetic import EVENTS

    queries = _EVENTS + [q for phrasings in EVENTS.values() for q in phrasings]
    lines = ["system\n", "user\n", "assistant\n"]
    for i, event in enumerate(queries):
        start, end = (7 * i) % 23 + 0.1 * (i % 10), (7 * i) % 23 + 4.5 + 0.3 * (i % 7)
        answer = f'<answer>{{"start_time": "{start:.1f}", "end_time": "{end:.1f}"}}</answer>'
        lines += [
            QUERY_TEMPLATE.format(query=event),
            f"<think>The query is about when {event}. Around {start:.1f} seconds the action begins, and it ends "
            f"near {end:.2f} seconds.</think>\n{answer}",
            answer,
            f"The event happens from {start:.1f} to {end:.1f} seconds.",
        ]
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = sorted(TINY_SPECIAL_TOKENS, key=TINY_SPECIAL_TOKENS.get)
    corpus = _corpus()
    for phrase in PHRASES:  # merges go to the rest; the phrases become tokens of their own below
        corpus = [line.replace(phrase, " ") for line in corpus]
    bpe_size = VOCAB_SIZE - len(PHRASES)
    while True:  # a phrase the BPE already learned is not added twice: grow the BPE part until 512 in all
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=bpe_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            min_frequency=1, show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer)
        tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in PHRASES])
        if tok.get_vocab_size() >= VOCAB_SIZE:
            return tok.to_str()
        bpe_size += VOCAB_SIZE - tok.get_vocab_size()


def build_tiny_tokenizer(save_dir: str | Path | None = None, family: str = "qwen2_5_vl"):
    """A fresh ``PreTrainedTokenizerFast`` with ``family``'s chat template (Qwen2.5-VL's or Qwen3-VL's). With
    ``save_dir``, also saved there (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``: loadable
    with ``AutoTokenizer.from_pretrained``) with the ``preprocessor_config.json`` and
    ``video_preprocessor_config.json`` a model directory of that family has."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from megatron_tr1.data.prompt import QWEN3_VL_CHAT_TEMPLATE

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_5_VL_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    if save_dir is not None:
        from megatron_tr1.data.processor import hf_preprocessor_configs

        save_dir = Path(save_dir)
        tokenizer.save_pretrained(save_dir)
        for name, config in hf_preprocessor_configs(family).items():
            (save_dir / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return tokenizer


def tiny_hf_config(tie_word_embeddings: bool = False, num_key_value_heads: int = 2, num_hidden_layers: int = 4,
                   vision_depth: int = 3, **text_overrides) -> Qwen2_5_VLConfig:
    """A tiny ``Qwen2_5_VLConfig``: LM hidden 128 (4 heads of 32), vocab 512, vision hidden 64 (4 heads)."""
    text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=num_hidden_layers,
                num_attention_heads=4, num_key_value_heads=num_key_value_heads, rms_norm_eps=1e-6,
                max_position_embeddings=2048, bos_token_id=TINY_SPECIAL_TOKENS["<|endoftext|>"],
                eos_token_id=TINY_SPECIAL_TOKENS["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]})
    text.update(text_overrides)
    vision = dict(depth=vision_depth, hidden_size=64, intermediate_size=96, num_heads=4, in_channels=3,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                  window_size=16, out_hidden_size=text["hidden_size"], fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
        image_token_id=TINY_SPECIAL_TOKENS["<|image_pad|>"], video_token_id=TINY_SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=TINY_SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=TINY_SPECIAL_TOKENS["<|vision_end|>"], attn_implementation="eager")


def tiny_hf_model(seed: int = 0, **cfg) -> Qwen2_5_VLForConditionalGeneration:
    """A random fp32 HF model from ``tiny_hf_config(**cfg)``; biases and norms are randomised too."""
    return _random_model(Qwen2_5_VLForConditionalGeneration, tiny_hf_config(**cfg), seed, ("norm", "ln_q"))


def _random_model(model_class, config, seed: int, markers: tuple[str, ...]):
    """``model_class(config)`` in fp32 from ``seed``, with every bias and every parameter whose name holds one of
    ``markers`` moved off its default too (HF initialises biases to 0 and norms to 1; make every tensor matter)."""
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(m in name for m in markers):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_qwen3_vl_config(tie_word_embeddings: bool = False, num_key_value_heads: int = 2, num_hidden_layers: int = 4,
                         vision_depth: int = 3, **text_overrides):
    """A tiny ``Qwen3VLConfig`` with every Qwen3-VL feature active: LM hidden 128 (4 heads of head_dim 32, set
    explicitly), QK-norm, interleaved M-RoPE [4, 6, 6]; vision hidden 64 (4 heads), patch 4, learned 8x8 position
    grid, DeepStack from vision blocks 0 and 1 (into LM layers 0 and 1). Same special-token ids as ``tiny_hf_config``."""
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=num_hidden_layers,
                num_attention_heads=4, num_key_value_heads=num_key_value_heads, head_dim=32, rms_norm_eps=1e-6,
                max_position_embeddings=2048, bos_token_id=TINY_SPECIAL_TOKENS["<|endoftext|>"],
                eos_token_id=TINY_SPECIAL_TOKENS["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True})
    text.update(text_overrides)
    vision = dict(depth=vision_depth, hidden_size=64, intermediate_size=96, num_heads=4, in_channels=3,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
        image_token_id=TINY_SPECIAL_TOKENS["<|image_pad|>"], video_token_id=TINY_SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=TINY_SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=TINY_SPECIAL_TOKENS["<|vision_end|>"], attn_implementation="eager")


def tiny_qwen3_vl_model(seed: int = 0, **cfg):
    """A random fp32 ``Qwen3VLForConditionalGeneration`` from ``tiny_qwen3_vl_config(**cfg)``; biases, norms
    (QK-norm and LayerNorm biases included) and the position embedding are randomised too."""
    from transformers import Qwen3VLForConditionalGeneration

    return _random_model(Qwen3VLForConditionalGeneration, tiny_qwen3_vl_config(**cfg), seed, ("norm", "pos_embed"))


def _demo_config(tiny):
    """The HF config of the demo's tiny model: ``tiny.family``'s architecture at ``tiny``'s sizes, tied embeddings,
    M-RoPE sections in the family's ratio (Qwen2.5-VL 1/4, 3/8, 3/8; Qwen3-VL 24:20:20), the last vision block
    attending in full (Qwen2.5-VL) or feeding DeepStack into LM layer 0 (Qwen3-VL)."""
    half = tiny.hidden_size // tiny.num_heads // 2
    sizes = dict(tie_word_embeddings=True, num_hidden_layers=tiny.num_layers, vision_depth=tiny.vision_depth,
                 hidden_size=tiny.hidden_size, num_attention_heads=tiny.num_heads,
                 num_key_value_heads=tiny.num_kv_heads, intermediate_size=tiny.intermediate_size)
    if tiny.family == "qwen3_vl":
        config = tiny_qwen3_vl_config(head_dim=2 * half, **sizes)
        t = round(half * 24 / 64)
        h = (half - t) // 2
        config.text_config.rope_parameters["mrope_section"] = [t, h, half - t - h]
    else:
        config = tiny_hf_config(**sizes)
        config.text_config.rope_parameters["mrope_section"] = [half // 4, (half - half // 4) // 2,
                                                               half - half // 4 - (half - half // 4) // 2]
    vc = config.vision_config
    vc.depth, vc.hidden_size, vc.num_heads = tiny.vision_depth, tiny.vision_hidden_size, tiny.vision_heads
    vc.intermediate_size, vc.patch_size = 2 * tiny.vision_hidden_size, tiny.patch_size
    if tiny.family == "qwen3_vl":
        vc.deepstack_visual_indexes = [tiny.vision_depth - 1]
    else:
        vc.window_size = 8 * tiny.patch_size  # 4x4 merged tokens per window, as Qwen2.5-VL's 112 px
        vc.fullatt_block_indexes = [tiny.vision_depth - 1]
    return config


def write_demo_model_dir(tiny, out: str | Path, seed: int = 0) -> Path:
    """An HF folder holding a random model of ``tiny``'s family and sizes (``rl.config.TinyModelConfig``), the tiny
    tokenizer (Qwen special tokens, the family's chat template) and the processor configs. Idempotent."""
    from megatron_tr1.models.family import hf_classes

    out = Path(out)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    config = _demo_config(tiny)
    torch.manual_seed(seed)
    model = hf_classes(tiny.family)[1](config).float()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer = build_tiny_tokenizer(tmp, tiny.family)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        processor = json.loads((tmp / name).read_text())
        processor["patch_size"] = tiny.patch_size
        (tmp / name).write_text(json.dumps(processor, indent=2) + "\n")
    del tokenizer
    tmp.rename(out)
    return out


def write_tiny_model_dir(hf, path: str | Path) -> str:
    """An HF folder of the tiny model ``hf`` that vLLM can load: weights, config, the tiny tokenizer, and processor
    configs for its 4-pixel patches with pixel bounds that leave tiny frames unresized (selftest, tests)."""
    from megatron_tr1.models.family import family_of

    path = Path(path)
    hf.save_pretrained(path)
    build_tiny_tokenizer(path, family_of(hf.config))
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        config = json.loads((path / name).read_text())
        config.update(patch_size=hf.config.vision_config.patch_size, min_pixels=64,
                      size={"shortest_edge": 64, "longest_edge": config["size"]["longest_edge"]})
        (path / name).write_text(json.dumps(config))
    return str(path)
