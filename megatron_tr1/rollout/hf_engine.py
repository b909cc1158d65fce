"""``HFEngine``: the pure-PyTorch rollout engine (HF ``Qwen2_5_VLForConditionalGeneration`` + a KV cache).

For machines where vLLM does not run, and as the reference the vLLM engine is tested against. Each prompt is
prefilled once at the trainer's M-RoPE positions (``engine.prompt_positions``), its KV cache is repeated ``n``
times and the ``n`` samples decode together, token ``k`` at position ``last + 1 + k``. Sampling is
temperature + top-p from one seeded ``torch.Generator`` per prompt.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from megatron_tr1.convert.mapping import hf_disk_name, name_list
from megatron_tr1.errors import CheckpointError
from megatron_tr1.rollout.engine import (Response, RolloutEngine, RolloutPrompt, Sampling, prompt_positions,
                                         stop_token_id)


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``[n]`` from float32 logits ``[n, V]`` and their log-probs under ``softmax(logits / T)``
    (raw logits when greedy); top-p keeps the smallest set of tokens whose probability reaches ``top_p``."""
    if sampling.temperature == 0:
        logprobs = torch.log_softmax(logits, -1)
        tokens = logits.argmax(-1)
    else:
        logprobs = torch.log_softmax(logits / sampling.temperature, -1)
        probs = logprobs.exp()
        if sampling.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # mass before this token suffices
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0))
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


class HFEngine(RolloutEngine):
    """Rollouts with HF transformers on CPU or one GPU; weights arrive through ``update_weights``; on GPU
    ``sleep`` parks the model in CPU memory."""

    def __init__(self, hf_config, tokenizer, model_dir: str | None = None, dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
        """Random weights from ``hf_config`` (to be pushed), or those of the HF directory ``model_dir``."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        if model_dir is None:
            model = Qwen2_5_VLForConditionalGeneration(hf_config)
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, config=hf_config)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config, self.tokenizer, self.device = hf_config, tokenizer, device
        self.dtype = dtype
        self.stop_id = stop_token_id(tokenizer)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        params = {hf_disk_name(k): v for k, v in self.model.state_dict().items()}
        count = 0
        for name, tensor in named_tensors:
            target = params.get(hf_disk_name(name))
            if target is None:
                raise CheckpointError(f"update_weights: unknown tensor {name!r}; expected one of "
                                      f"{name_list(params)}")
            if target.shape != tensor.shape:
                raise CheckpointError(f"update_weights: tensor {name} has shape {tuple(tensor.shape)}, the engine's "
                                      f"model has {tuple(target.shape)}; the engine was built from another config")
            target.copy_(tensor)
            count += 1
        return count

    def sleep(self) -> None:
        if self.device != "cpu":
            self.model.to("cpu")

    def wake_up(self) -> None:
        self.model.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling) -> list[list[Response]]:
        return [self._generate_one(p, n, sampling, i) for i, p in enumerate(prompts)]

    def _generate_one(self, prompt: RolloutPrompt, n: int, sampling: Sampling, index: int) -> list[Response]:
        generator = torch.Generator(self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed + index)
        positions = prompt_positions(self.config, prompt).to(self.device)
        video = {}
        if prompt.video is not None:
            video = dict(pixel_values_videos=prompt.video.pixel_values_videos.to(self.device, self.model.dtype),
                         video_grid_thw=prompt.video.video_grid_thw.to(self.device))
        out = self.model(input_ids=torch.tensor([prompt.input_ids], device=self.device),
                         position_ids=positions[:, None], use_cache=True, **video)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().expand(n, -1)
        next_position = int(positions[:, -1].max()) + 1
        tokens, logprobs = [], []
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for step in range(sampling.max_tokens):
            token, logprob = sample_next(logits, sampling, generator)
            tokens.append(token)
            logprobs.append(logprob)
            done |= token == self.stop_id
            if bool(done.all()) or step == sampling.max_tokens - 1:
                break
            step_positions = torch.full((3, n, 1), next_position + step, device=self.device)
            out = self.model(input_ids=token[:, None], position_ids=step_positions, past_key_values=cache,
                             use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        return [self._response(torch.stack(tokens, 1)[i].tolist(), torch.stack(logprobs, 1)[i].tolist())
                for i in range(n)]

    def _response(self, token_ids: list[int], logprobs: list[float]) -> Response:
        """Cut at the first stop token (kept); finished rows kept sampling in lockstep after it."""
        if self.stop_id in token_ids:
            end = token_ids.index(self.stop_id) + 1
            token_ids, logprobs, reason = token_ids[:end], logprobs[:end], "stop"
        else:
            reason = "length"
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Response(token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=reason)
