"""Test support: tiny models and tokenizers built locally, and the CPU stand-in for megatron-core's
CUDA-only calls. Used by the tests and the CPU demo; never imported on the GPU training path.

The tiny tokenizer puts the Qwen2.5-VL special tokens at these fixed ids, and the tiny model config uses
the same ids, so the two always agree.
"""

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
