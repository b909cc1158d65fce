"""``Qwen2_5_VLModel``: vision tower (first pipeline stage) + M-RoPE decoder, TP x PP on megatron-core.

On the first stage the visual token embeddings replace the ``<|image_pad|>`` / ``<|video_pad|>`` token
embeddings (megatron layout ``[s, b, h]``, sequence parallelism off). Later stages receive hidden states
through ``set_input_tensor`` (megatron's pipeline schedules call it). ``forward`` returns logits on the last
stage; ``forward_logprobs`` is the one RL forward: per-token log-probs of ``labels`` from the final hidden
states and this rank's LM-head shard with ``kernels.fused_linear_logprobs`` on the TP group, no logits.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

import kernels
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl.config import language_config, vision_config
from megatron_tr1.models.qwen2_5_vl.language import LanguageModel
from megatron_tr1.models.qwen2_5_vl.specs import build_layer_specs
from megatron_tr1.models.qwen2_5_vl.vision import VisionTower


class Qwen2_5_VLModel(MegatronModule):
    """Qwen2.5-VL for this rank's (TP, PP) position; parallel state must be initialised first.

    The family's parts are class attributes (its config builders, decoder and vision tower classes, QK-norm), so a
    family that differs only in them (``models.qwen3_vl.Qwen3VLModel``) subclasses this and sets its own."""

    language_config = staticmethod(language_config)
    vision_config = staticmethod(vision_config)
    language_class = LanguageModel
    vision_class = VisionTower
    qk_layernorm = False

    def __init__(self, hf_config, layer_spec: str = "local", params_dtype: torch.dtype = torch.float32,
                 cpu_init: bool = False, sequence_parallel: bool = False, recompute: str = "none"):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        config = self.language_config(hf_config, tp, pp, params_dtype, cpu_init, sequence_parallel, recompute)
        super().__init__(config)
        if sequence_parallel:
            raise ConfigError(f"{type(self).__name__}(sequence_parallel=True): sequence parallelism is not supported "
                              "yet (the visual embeddings are spliced into the full-sequence embeddings)")
        self.hf_config = hf_config
        self.model_type = ModelType.encoder_or_decoder  # for megatron's pipeline schedules
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.share_embeddings_and_output_weights = hf_config.tie_word_embeddings
        specs = build_layer_specs(layer_spec, qk_layernorm=self.qk_layernorm)
        self.vision = None
        if self.pre_process:
            self.vision = self.vision_class(
                self.vision_config(hf_config, tp, params_dtype, cpu_init, sequence_parallel), hf_config, specs)
        self.language_model = self.language_class(config, hf_config, specs, self.pre_process, self.post_process)
        self._specs = specs

    # --- pipeline plumbing (megatron's schedules and finalize_model_grads look these up) ---
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def freeze(self, vision_tower: bool = False, merger: bool = False, language_model: bool = False) -> None:
        """Stop gradients for the chosen parts (True freezes; False leaves the part as it is)."""
        parts = []
        if self.vision is not None and vision_tower:
            parts += self.vision.tower_parts()
        if self.vision is not None and merger:
            parts += self.vision.merger_parts()
        if language_model:
            parts.append(self.language_model)
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor, pixel_values_videos=None, video_grid_thw=None, pixel_values=None,
              image_grid_thw=None) -> torch.Tensor:
        """First stage: token embeddings ``[s, b, h]`` with the visual embeddings at the pad tokens."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None).transpose(0, 1)
        for pixels, grid, token_id, name in ((pixel_values, image_grid_thw, self.hf_config.image_token_id, "image"),
                                             (pixel_values_videos, video_grid_thw, self.hf_config.video_token_id,
                                              "video")):
            if pixels is None:
                continue
            visual = self.vision(pixels, grid).to(embeddings.dtype)
            mask = input_ids == token_id
            if int(mask.sum()) != visual.shape[0]:
                raise ConfigError(f"input_ids hold {int(mask.sum())} {name} pad tokens but {name}_grid_thw="
                                  f"{grid.tolist()} gives {visual.shape[0]} {name} embeddings")
            embeddings = embeddings.masked_scatter(mask[..., None], visual)
        return embeddings.transpose(0, 1).contiguous()

    def _decoder_input(self, input_ids, pixel_values_videos, video_grid_thw, pixel_values, image_grid_thw):
        if not self.pre_process:
            return None  # hidden states come from the previous stage via set_input_tensor
        return self.embed(input_ids, pixel_values_videos, video_grid_thw, pixel_values, image_grid_thw)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                pixel_values_videos=None, video_grid_thw=None, pixel_values=None, image_grid_thw=None,
                labels=None) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` (gathered over TP) on the last stage, else hidden states ``[s, b, h]``.

        ``position_ids`` ``[3, b, s]`` from ``get_rope_index``; ``attention_mask`` ``[b, s]`` (1 = token, 0 =
        padding) or None for unpadded causal batches. With ``labels`` ``[b, s]`` (the target of each
        position), returns megatron's per-token cross-entropy ``[b, s]`` instead of logits.
        """
        decoder_input = self._decoder_input(input_ids, pixel_values_videos, video_grid_thw, pixel_values,
                                            image_grid_thw)
        return self.language_model(
            input_ids=input_ids, position_ids=position_ids, decoder_input=decoder_input,
            attention_mask=self._specs.language_attention(attention_mask), labels=labels,
            runtime_gather_output=labels is None)

    def forward_logprobs(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                         pixel_values_videos=None, video_grid_thw=None, temperature: float = 1.0,
                         return_entropy: bool = False, attention_mask=None, cu_seqlens=None):
        """log p(labels) ``[b, s]`` float32 at ``temperature`` (and the entropy) on the last stage.

        ``labels`` ``[b, s]`` hold the token each position predicts, -100 to ignore. Other stages return
        their hidden states ``[s, b, h]`` for the pipeline schedule. Packed sequences: ``b = 1`` and
        ``cu_seqlens`` (``[B + 1]``, int) their bounds in the row; ``position_ids`` restart in each sequence.
        """
        decoder_input = self._decoder_input(input_ids, pixel_values_videos, video_grid_thw, None, None)
        attention = dict(attention_mask=self._specs.language_attention(attention_mask)) if cu_seqlens is None \
            else self._specs.packed_attention(cu_seqlens)
        hidden = self.language_model.final_hidden(decoder_input, position_ids, **attention)
        if not self.post_process:
            return hidden
        return kernels.fused_linear_logprobs(
            hidden.transpose(0, 1), self.language_model.output_weight(), labels, temperature,
            tp_group=parallel_state.get_tensor_model_parallel_group(), return_entropy=return_entropy)
