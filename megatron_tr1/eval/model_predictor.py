"""A model as an ``eval.evaluate.Predictor``: greedy decoding of the grounding prompt through a rollout engine.

``EnginePredictor(engine, tokenizer, hf_config, video_budget, think)`` decodes each sample's frames with the
training budget (``rl.config.VideoBudget``), builds the Temporal-R1 prompt (think or answer-only) and asks the
engine for one greedy response per prompt, in batches. The trainer evaluates each stage with it (its predictor
of the other prompt mode reuses the decoded frames: ``frames_from``); ``tr1 eval --model DIR`` builds one from an
HF folder (or a tr1 Megatron checkpoint, exported on the fly).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from megatron_tr1.data.annotations import Sample
from megatron_tr1.rl.prompts import prompt_in_mode, sample_prompt
from megatron_tr1.rollout.engine import RolloutPrompt, Sampling


class EnginePredictor:
    """Greedy answers from ``engine`` (``rollout.engine.RolloutEngine``) holding the model's weights."""

    def __init__(self, engine, tokenizer, hf_config, video, think: bool = True, max_tokens: int = 256,
                 batch_size: int = 32, name: str = "model", progress: bool = True,
                 frames_from: "EnginePredictor | None" = None):
        self.engine, self.tokenizer, self.hf_config, self.video = engine, tokenizer, hf_config, video
        self.think, self.max_tokens, self.batch_size, self.name = think, max_tokens, batch_size, name
        self.progress = progress
        self._prompts: dict[str, RolloutPrompt] = {}
        self._frames_from = frames_from  # a predictor (same video budget) whose decoded prompts this one reuses

    def prompts(self, samples: Sequence[Sample]) -> list[RolloutPrompt]:
        """The samples' prompts (decoded once per sample and kept: the trainer evaluates every stage on them)."""
        other = self._frames_from._prompts if self._frames_from is not None else {}
        for s in samples:
            if s.id not in self._prompts:
                self._prompts[s.id] = prompt_in_mode(other[s.id], s.query, self.tokenizer, self.think) \
                    if s.id in other else sample_prompt(s, self.tokenizer, self.hf_config, self.video, self.think)
        return [self._prompts[s.id] for s in samples]

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        prompts = self.prompts(samples)
        greedy = Sampling(temperature=0.0, max_tokens=self.max_tokens)
        texts: list[str] = []
        with tqdm(total=len(prompts), desc=f"eval {self.name}", unit="sample", disable=not self.progress,
                  leave=False) as bar:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start: start + self.batch_size]
                texts += [group[0].text for group in self.engine.generate(batch, 1, greedy)]
                bar.update(len(batch))
        return texts


def load_model_predictor(model_dir: str | Path, engine_kind: str, video, think: bool, max_tokens: int,
                         name: str | None = None) -> EnginePredictor:
    """A predictor for an HF folder or a tr1 Megatron checkpoint folder (``tr1_mcore.json``; exported to a
    temporary HF folder first) on the ``engine_kind`` engine ("hf" or "vllm")."""
    import torch

    from megatron_tr1.convert.checkpoint import META
    from megatron_tr1.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_tr1.rl.policy import load_hf_config_and_tokenizer
    from megatron_tr1.rollout.engine import make_engine

    model_dir = Path(model_dir)
    if (model_dir / META).is_file():
        hf_dir = Path(tempfile.mkdtemp(prefix="tr1-eval-")) / "hf"
        convert_mcore_to_hf(model_dir, hf_dir, progress=False)
        model_dir = hf_dir
    hf_config, tokenizer = load_hf_config_and_tokenizer(model_dir)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    kwargs = {"model_dir": str(model_dir), "dtype": dtype}
    if engine_kind == "hf" and torch.cuda.is_available():
        kwargs["device"] = "cuda"
    engine = make_engine(engine_kind, hf_config, tokenizer, **kwargs)
    return EnginePredictor(engine, tokenizer, hf_config, video, think=think, max_tokens=max_tokens,
                           name=name or model_dir.name)
