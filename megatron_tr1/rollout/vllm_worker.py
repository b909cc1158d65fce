"""Inside vLLM's worker: weight reload from a tensor stream, trainer M-RoPE positions, and the CPU torchvision fix.

``WorkerExtension`` is vLLM's ``worker_extension_cls``; ``VLLMEngine`` calls its methods through
``LLM.collective_rpc``. The in-process executor (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) hands them the stream
itself, so tensors never go through RPC serialisation.

``python -m megatron_tr1.rollout.vllm_worker`` installs the CPU torchvision fix (``megatron_tr1.torchvision_cpu``)
into this environment (README "Rollouts on CPU").
"""
from __future__ import annotations

import torch

from megatron_tr1.torchvision_cpu import install_torchvision_hook


def trainer_mrope_positions(model, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
    """vLLM's ``get_mrope_input_positions`` with the trainer's positions: the prompt's from
    ``get_rope_index``, and generated tokens continuing from the last prompt position + 1.

    vLLM's own (vllm 0.32 ``Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions``) follow the same
    rule but truncate ``frame * tokens_per_second * second_per_grid_ts`` in float64, where ``get_rope_index``,
    like transformers, does so in float32: a temporal id can differ by one (never seen for clips short enough
    to be sampled at the full 2 fps, but for about 1 in 10 clips of 5 s to 30 min at common frame rates,
    where the 768-frame cap lowers the rate), so they are replaced.

    Qwen3-VL: the grids come from the features themselves (vLLM's Qwen3-VL model has no ``iter_mm_grid_thw``) and the
    positions from ``models.positions.get_rope_index`` (one grid per frame; vLLM's own are equal, tested in
    ``tests/models/test_qwen3_vl_rope_index.py``; replaced all the same so one function decides)."""
    from megatron_tr1.models.family import QWEN3_VL, family_of
    from megatron_tr1.models.positions import get_rope_index

    if family_of(model.config, "vLLM model config") == QWEN3_VL:
        ordered = sorted(mm_features, key=lambda f: f.mm_position.offset)
        grids = {m: [f.data[f"{m}_grid_thw"].data.tolist() for f in ordered if f.modality == m]
                 for m in ("image", "video")}
        positions = get_rope_index(
            model.config, torch.tensor([input_tokens]),
            image_grid_thw=torch.tensor(grids["image"]) if grids["image"] else None,
            video_grid_thw=torch.tensor(grids["video"]) if grids["video"] else None)[:, 0]
        return positions, int(positions.max()) + 1 - len(input_tokens)
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

    def restore_input_norm(self) -> None:
        """After ``load_format="dummy"``: rebuild the vision tower's input normalisation, whose buffers come from the
        processor config (not the checkpoint), so the dummy loader randomised them and no weight load restores them
        (video log-probs were then up to 0.05 off the trainer's; 4.8e-7 after this)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.fusion.mm_input_norm import build_mm_input_norm

        model = self.model_runner.get_model()
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "input_norm"):
            return
        device = next(visual.parameters()).device
        with set_current_vllm_config(self.vllm_config):
            visual.input_norm = build_mm_input_norm(self.model_config).to(device)

    def vocab_range(self) -> tuple[int, int]:
        """The token ids ``[start, end)`` of the vocabulary this worker's embedding shard holds."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        embedding = next(m for m in self.model_runner.get_model().modules() if isinstance(m, VocabParallelEmbedding))
        return embedding.shard_indices.org_vocab_start_index, embedding.shard_indices.org_vocab_end_index

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
