"""``HFEngine``: the pure-PyTorch rollout engine (HF ``Qwen2_5_VLForConditionalGeneration`` or
``Qwen3VLForConditionalGeneration``, by the config's family, + a KV cache).

For machines where vLLM does not run, and as the reference the vLLM engine is tested against. Prompts are
prefilled together (left-padded, up to ``max_batch_prompts``) at the trainer's M-RoPE positions
(``engine.prompt_positions``), each prompt's KV cache is repeated ``n`` times and all samples decode together,
token ``k`` of a response at position ``last + 1 + k`` of its prompt. Sampling is temperature + top-p from one
seeded ``torch.Generator`` per prompt (its seed: ``engine.prompt_seeds``).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from megatron_tr1.convert.mapping import hf_disk_name, name_list
from megatron_tr1.errors import CheckpointError
from megatron_tr1.models.family import family_of, hf_classes
from megatron_tr1.data.prompt import RolloutPrompt
from megatron_tr1.rollout.engine import (Response, RolloutEngine, Sampling, prompt_positions, prompt_seeds,
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
                 device: str = "cpu", max_batch_prompts: int = 64):
        """Random weights from ``hf_config`` (to be pushed), or those of the HF directory ``model_dir``;
        ``generate`` prefills up to ``max_batch_prompts`` prompts together."""
        _, model_class = hf_classes(family_of(hf_config, "hf_config"))
        if model_dir is None:
            model = model_class(hf_config)
        else:
            model = model_class.from_pretrained(model_dir, config=hf_config)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config, self.tokenizer, self.device = hf_config, tokenizer, device
        self.dtype, self.max_batch_prompts = dtype, max_batch_prompts
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
    def generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling,
                 seeds: Sequence[int] | None = None) -> list[list[Response]]:
        seeds = prompt_seeds(prompts, sampling, seeds)
        out = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            end = start + self.max_batch_prompts
            out += self._generate_batch(prompts[start: end], n, sampling, seeds[start: end])
        return out

    def _generate_batch(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling,
                        seeds: Sequence[int | None]) -> list[list[Response]]:
        """Prefill the prompts together (left-padded), repeat each one's cache ``n`` times, decode all rows."""
        generators = []
        for seed in seeds:
            generator = torch.Generator(self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
            generators.append(generator)
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        positions = torch.zeros(3, len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            k = len(p.input_ids)
            ids[i, width - k:] = torch.tensor(p.input_ids)
            mask[i, width - k:] = 1
            positions[:, i, width - k:] = prompt_positions(self.config, p)
        video = {}
        videos = [p.video for p in prompts if p.video is not None]
        if videos:
            video = dict(pixel_values_videos=torch.cat([v.pixel_values_videos for v in videos]).to(
                self.device, self.model.dtype), video_grid_thw=torch.cat([v.video_grid_thw for v in videos]).to(
                self.device))
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True, **video)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().repeat_interleave(n, 0)
        mask = mask.to(self.device).repeat_interleave(n, 0)
        next_position = (positions.amax(dim=(0, 2)) + 1).to(self.device).repeat_interleave(n)
        tokens, logprobs = [], []
        done = torch.zeros(len(prompts) * n, dtype=torch.bool, device=self.device)
        for step in range(sampling.max_tokens):
            sampled = [sample_next(logits[i * n:(i + 1) * n], sampling, g) for i, g in enumerate(generators)]
            token, logprob = torch.cat([t for t, _ in sampled]), torch.cat([lp for _, lp in sampled])
            tokens.append(token)
            logprobs.append(logprob)
            done |= token == self.stop_id
            if bool(done.all()) or step == sampling.max_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step_positions = (next_position + step)[None, :, None].expand(3, -1, 1)
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=step_positions,
                             past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        tokens, logprobs = torch.stack(tokens, 1), torch.stack(logprobs, 1)
        return [[self._response(tokens[i * n + j].tolist(), logprobs[i * n + j].tolist()) for j in range(n)]
                for i in range(len(prompts))]

    def _response(self, token_ids: list[int], logprobs: list[float]) -> Response:
        """Cut at the first stop token (kept); finished rows kept sampling in lockstep after it."""
        if self.stop_id in token_ids:
            end = token_ids.index(self.stop_id) + 1
            token_ids, logprobs, reason = token_ids[:end], logprobs[:end], "stop"
        else:
            reason = "length"
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Response(token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=reason)
