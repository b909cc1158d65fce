"""``Qwen3VLModel``: Qwen3-VL (dense) on megatron-core, TP x PP; the public interface of ``Qwen2_5_VLModel``.

It is ``Qwen2_5_VLModel`` (pipeline plumbing, the padded and packed forwards, the fused log-prob path) with
Qwen3-VL's parts, set as the class attributes ``Qwen2_5_VLModel.__init__`` builds from: the decoder with QK-norm and
interleaved M-RoPE (``language.py``), the vision tower with learned positions and DeepStack mergers (``vision.py``);
and DeepStack itself.

**QK-norm and TP.** ``q_layernorm`` / ``k_layernorm`` weights are replicated over TP while each rank normalises only its
own heads, so after a backward pass each rank holds a partial gradient; megatron's ``finalize_model_grads`` sums them
over TP (the config sets ``qk_layernorm``), as the trainer's optimizer step does for any megatron-core model.

**DeepStack.** The vision tower also returns one feature tensor per ``deepstack_visual_indexes`` entry; feature
``k`` is ADDED to the visual tokens' hidden states right after LM decoder layer ``k`` (HF's ``_deepstack_process``).
Those layers all sit on pipeline stage 0 (``Dims.validate`` refuses other layouts), where the visual tokens are
known. ``DeepStack`` puts a forward hook on each of those layers (once, at construction); a forward registers its
features and the visual positions (``input_ids`` equal to the image / video token, in HF's ``[b, s]`` order; the
same code serves the padded ``[s, b, h]`` and the packed ``[t, 1, h]`` layouts) and the hooks add them. The hooks
add the features *detached*, and their gradient takes a side road: each hook registers a tensor hook that keeps the
gradient of its layer's output, and ``_Bridge`` (an identity on the decoder input) hands those gradients to the
features when the backward pass reaches the decoder input, after every decoder layer.

This is what makes ``recompute="full"`` work: megatron's reentrant checkpoints re-run the layers (and the hooks)
inside the backward pass, after the forward has returned and perhaps after other micro-batches' forwards (1F1B). A
re-run finds its forward's features by the rotary-angle tensor it is given (a checkpoint input, so the re-run gets a
detached view of the same storage): the first run files the features under that tensor's ``data_ptr`` until the
tensor is freed (``weakref.finalize``). A direct ``hidden + feature`` inside the checkpoint would also pull the
vision graph into the checkpoint's nested backward, and free it there under the outer one.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl.model import Qwen2_5_VLModel
from megatron_tr1.models.qwen3_vl.config import language_config, vision_config
from megatron_tr1.models.qwen3_vl.language import LanguageModel
from megatron_tr1.models.qwen3_vl.vision import VisionTower


def _add_at(hidden: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[s, b, h]`` plus ``values`` ``[n, h]`` at the ``n`` True entries of ``mask`` ``[b, s]`` (row-major,
    HF's order); out of place."""
    added = hidden.transpose(0, 1).index_put((mask,), values.to(hidden.dtype), accumulate=True)
    return added.transpose(0, 1).contiguous()


class _Bridge(torch.autograd.Function):
    """Identity on the decoder input; its backward (which runs after every decoder layer's) returns the DeepStack
    features' gradients that the layer hooks kept (``_Features.grads[k]`` ``[s, b, h]``, at the visual positions)."""

    @staticmethod
    def forward(ctx, decoder_input, state, *features):
        ctx.state = state
        ctx.shapes = [(f.shape, f.dtype) for f in features]
        return decoder_input.clone()

    @staticmethod
    def backward(ctx, grad):
        state = ctx.state
        out = []
        for k, (shape, dtype) in enumerate(ctx.shapes):
            g = state.grads.pop(k, None)
            out.append(torch.zeros(shape, dtype=dtype, device=grad.device) if g is None
                       else g.transpose(0, 1)[state.mask].to(dtype))
        return (grad, None, *out)


class _Features:
    """One forward's DeepStack features ``[n, h]`` each, their positions ``mask`` ``[b, s]`` and the gradients of the
    fed layers' outputs (filled during the backward pass)."""

    def __init__(self, mask: torch.Tensor, features: list[torch.Tensor]):
        self.mask, self.features, self.grads = mask, features, {}


class DeepStack:
    """The forward hooks adding DeepStack features after decoder layers ``0 .. count-1`` (module docstring)."""

    def __init__(self, layers, count: int):
        if count > len(layers):
            raise ConfigError(f"DeepStack feeds {count} LM layers but pipeline stage 0 holds {len(layers)}; they "
                              f"must all sit on stage 0 (model.pipeline_parallel)")
        self.count = count
        self.in_forward = False
        self.current: _Features | None = None  # the forward in progress
        self.saved: dict[int, _Features] = {}  # rotary data_ptr -> features, for re-runs in the backward pass
        for k in range(count):
            layers[k].register_forward_hook(functools.partial(self._hook, k), with_kwargs=True)

    @contextlib.contextmanager
    def forward_scope(self):
        self.in_forward, self.current = True, None
        try:
            yield self
        finally:
            self.in_forward, self.current = False, None

    def attach(self, decoder_input: torch.Tensor, mask: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Use ``features`` at ``mask`` ``[b, s]`` in this forward; returns the decoder input to use."""
        self.current = _Features(mask, features)
        if torch.is_grad_enabled() and (decoder_input.requires_grad or any(f.requires_grad for f in features)):
            decoder_input = _Bridge.apply(decoder_input, self.current, *features)
        return decoder_input

    def _hook(self, k: int, module, args, kwargs, output):
        rotary = kwargs.get("rotary_pos_emb")
        key = rotary.data_ptr() if isinstance(rotary, torch.Tensor) else None
        if self.in_forward:
            state = self.current
            if state is not None and key is not None and key not in self.saved:
                self.saved[key] = state
                weakref.finalize(rotary, self.saved.pop, key, None)
        else:  # a checkpoint re-running the layer in the backward pass
            state = self.saved.get(key) if key is not None else None
        if state is None:
            return None
        hidden, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        hidden = _add_at(hidden, state.mask, state.features[k].detach())
        if hidden.requires_grad and state.features[k].requires_grad:
            hidden.register_hook(lambda g: state.grads.__setitem__(k, g))
        return hidden if rest is None else (hidden, *rest)


class Qwen3VLModel(Qwen2_5_VLModel):
    """Qwen3-VL (dense) for this rank's (TP, PP) position; parallel state must be initialised first."""

    language_config = staticmethod(language_config)
    vision_config = staticmethod(vision_config)
    language_class = LanguageModel
    vision_class = VisionTower
    qk_layernorm = True

    def __init__(self, hf_config, layer_spec: str = "local", params_dtype: torch.dtype = torch.float32,
                 cpu_init: bool = False, sequence_parallel: bool = False, recompute: str = "none"):
        super().__init__(hf_config, layer_spec, params_dtype, cpu_init, sequence_parallel, recompute)
        count = len(hf_config.vision_config.deepstack_visual_indexes)
        self.deepstack = DeepStack(self.language_model.decoder.layers, count) if self.pre_process and count else None

    def _embed(self, input_ids, pixel_values_videos=None, video_grid_thw=None, pixel_values=None,
               image_grid_thw=None):
        """Token embeddings ``[s, b, h]`` with the visual embeddings at the pad tokens, the visual mask ``[b, s]``
        (None without visual inputs) and the DeepStack features over it (images and videos in token order)."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None).transpose(0, 1)
        masks, deepstack = [], []
        for pixels, grid, token_id, name in ((pixel_values, image_grid_thw, self.hf_config.image_token_id, "image"),
                                             (pixel_values_videos, video_grid_thw, self.hf_config.video_token_id,
                                              "video")):
            if pixels is None:
                continue
            visual, features = self.vision(pixels, grid)
            mask = input_ids == token_id
            if int(mask.sum()) != visual.shape[0]:
                raise ConfigError(f"input_ids hold {int(mask.sum())} {name} pad tokens but {name}_grid_thw="
                                  f"{grid.tolist()} gives {visual.shape[0]} {name} embeddings")
            embeddings = embeddings.masked_scatter(mask[..., None], visual.to(embeddings.dtype))
            masks.append(mask)
            deepstack.append(features)
        if not masks:
            return embeddings.transpose(0, 1).contiguous(), None, []
        union = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        features = []
        for per_kind in zip(*deepstack):  # one DeepStack level: each kind's rows at its positions in the union
            joint = per_kind[0].new_zeros(int(union.sum()), per_kind[0].shape[-1])
            for mask, feature in zip(masks, per_kind):
                joint = joint.index_put((mask[union],), feature)
            features.append(joint)
        return embeddings.transpose(0, 1).contiguous(), union, features

    def embed(self, input_ids: torch.Tensor, pixel_values_videos=None, video_grid_thw=None, pixel_values=None,
              image_grid_thw=None) -> torch.Tensor:
        """First stage: token embeddings ``[s, b, h]`` with the visual embeddings at the pad tokens (the DeepStack
        features are added inside the decoder, by ``forward`` / ``forward_logprobs``)."""
        return self._embed(input_ids, pixel_values_videos, video_grid_thw, pixel_values, image_grid_thw)[0]

    def _decoder_input(self, input_ids, pixel_values_videos, video_grid_thw, pixel_values, image_grid_thw):
        if not self.pre_process:
            return None  # hidden states come from the previous stage via set_input_tensor
        embeddings, mask, features = self._embed(input_ids, pixel_values_videos, video_grid_thw, pixel_values,
                                                 image_grid_thw)
        if features:
            embeddings = self.deepstack.attach(embeddings, mask, features)
        return embeddings

    def _scope(self):
        return self.deepstack.forward_scope() if self.deepstack is not None else contextlib.nullcontext()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                pixel_values_videos=None, video_grid_thw=None, pixel_values=None, image_grid_thw=None,
                labels=None) -> torch.Tensor:
        """As ``Qwen2_5_VLModel.forward`` (logits ``[b, s, vocab]`` on the last stage, or per-token CE with
        ``labels``; hidden states ``[s, b, h]`` elsewhere), with DeepStack on stage 0."""
        with self._scope():
            return super().forward(input_ids, position_ids, attention_mask, pixel_values_videos, video_grid_thw,
                                   pixel_values, image_grid_thw, labels)

    def forward_logprobs(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                         pixel_values_videos=None, video_grid_thw=None, temperature: float = 1.0,
                         return_entropy: bool = False, attention_mask=None, cu_seqlens=None):
        """As ``Qwen2_5_VLModel.forward_logprobs`` (padded, or packed with ``cu_seqlens`` and ``b = 1``), with
        DeepStack on stage 0."""
        with self._scope():
            return super().forward_logprobs(input_ids, position_ids, labels, pixel_values_videos, video_grid_thw,
                                            temperature, return_entropy, attention_mask, cu_seqlens)
