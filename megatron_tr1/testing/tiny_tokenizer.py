"""A tiny, deterministic Qwen2.5-VL-shaped tokenizer for tests and the CPU demo.

Byte-level BPE (``tokenizers``) with a 512-token vocabulary trained on a built-in corpus of Temporal-R1
queries and answers. The Qwen2.5-VL special tokens sit at ``TINY_SPECIAL_TOKENS``' ids (0..7), eos is
``<|im_end|>``, pad is ``<|endoftext|>``, and the chat template is Qwen2.5-VL's own, so prompts have the real
shape. Byte-level means any text decodes back exactly.

Two choices keep the demo's sequences short (its CPU budget is set by tokens per step): the fixed phrases of
the task (``PHRASES``: the system prompts, the query template around the caption, the answer's tags and JSON
keys) are single tokens, as a domain tokenizer's merges would make them; and digits are split one per token,
as Qwen2's tokenizer does, so a time is spelled digit by digit. A demo prompt is ~50 tokens, not ~170.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from megatron_tr1.data.prompt import QUERY_TEMPLATE, SYSTEM_PROMPT_NO_THINK, SYSTEM_PROMPT_THINK
from megatron_tr1.testing import TINY_SPECIAL_TOKENS

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


def build_tiny_tokenizer(save_dir: str | Path | None = None):
    """A fresh ``PreTrainedTokenizerFast``. With ``save_dir``, also saved there (``tokenizer.json``,
    ``tokenizer_config.json``, ``chat_template.jinja``: loadable with ``AutoTokenizer.from_pretrained``) with
    the ``preprocessor_config.json`` and ``video_preprocessor_config.json`` a Qwen2.5-VL model directory has."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    if save_dir is not None:
        from megatron_tr1.data.processor import hf_preprocessor_configs

        save_dir = Path(save_dir)
        tokenizer.save_pretrained(save_dir)
        for name, config in hf_preprocessor_configs().items():
            (save_dir / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return tokenizer


def vocab_size() -> int:
    """Number of token ids of the tiny tokenizer (special tokens included)."""
    return len(build_tiny_tokenizer())
