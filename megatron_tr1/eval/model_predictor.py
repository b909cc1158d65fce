"""A model as an ``eval.evaluate.Predictor``: greedy decoding of the grounding prompt through a rollout engine.

``EnginePredictor(engine, cache, think)`` takes each sample's prompt in the mode ``think`` (``data.prompt``: the
training prompts with think (True) or answer-only (False), or the seed's evaluation prompts "r1" / "custom") from a
``data.prompt_cache.PromptCache`` (frames decoded with the training budget, ``data.video.VideoBudget``, once while kept)
and asks the engine for one greedy response per prompt, a batch at a time (only a batch's videos need be in
memory). The trainer evaluates each stage with it (both modes share the trainer's cache); ``tr1 eval --model DIR``
builds one from an HF folder (or a tr1 Megatron checkpoint, exported to a temporary folder that is removed once the
engine holds the weights).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.prompt_cache import PromptCache
from megatron_tr1.rollout.engine import Sampling


class EnginePredictor:
    """Greedy answers from ``engine`` (``rollout.engine.RolloutEngine``) holding the model's weights. A sample whose
    video cannot be decoded is a ``DataError`` naming the file, or with ``lenient`` a None answer (skipped: warned
    once per video and counted in ``cache.skipped``)."""

    def __init__(self, engine, cache: PromptCache, think: bool | str = True, max_tokens: int = 256,
                 batch_size: int = 32, name: str = "model", progress: bool = True, lenient: bool = False):
        self.engine, self.cache, self.think, self.max_tokens = engine, cache, think, max_tokens
        self.batch_size, self.name, self.progress, self.lenient = batch_size, name, progress, lenient

    def _build(self, samples: Sequence[Sample]):
        return self.cache.prompts_or_skip(samples, self.think) if self.lenient else self.cache(samples, self.think)

    def predict(self, samples: Sequence[Sample]) -> list[str | None]:
        greedy = Sampling(temperature=0.0, max_tokens=self.max_tokens)
        if hasattr(self.engine, "generate_shared"):  # every rank a rollout worker (rollout.placement)
            out = self.engine.generate_shared(len(samples), lambda idx: self._build([samples[i] for i in idx]), 1,
                                              greedy, self.batch_size)
            return [None if o is None else o[0].text for o in out]
        texts: list[str | None] = []
        with tqdm(total=len(samples), desc=f"eval {self.name}", unit="sample", disable=not self.progress,
                  leave=False) as bar:
            for start in range(0, len(samples), self.batch_size):
                part = samples[start: start + self.batch_size]
                batch = self._build(part)
                answers = iter(self.engine.generate([p for p in batch if p is not None], 1, greedy))
                texts += [None if p is None else next(answers)[0].text for p in batch]
                bar.update(len(batch))
        return texts


def load_model_predictor(model_dir: str | Path, engine_kind: str, video, think: bool | str, max_tokens: int,
                         name: str | None = None, backend=None, key: str = "--model", lenient: bool = False
                         ) -> EnginePredictor:
    """A predictor for an HF folder or a tr1 Megatron checkpoint folder (``tr1_mcore.json``; exported to a
    temporary HF folder, removed once the engine is built) on the ``engine_kind`` engine ("hf" or "vllm") of
    ``backend`` (default: ``backend.resolve()``). The folder is checked first (``convert.model_dir.check_model_dir``;
    errors name ``key``, the option that gave it)."""
    from megatron_tr1.backend import resolve
    from megatron_tr1.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_tr1.convert.model_dir import check_model_dir, load_hf_config_and_tokenizer
    from megatron_tr1.rollout.factory import make_engine

    model_dir = Path(model_dir)
    side, weights = check_model_dir(model_dir, key)  # before converting or building anything
    backend = backend or resolve()
    with tempfile.TemporaryDirectory(prefix="tr1-eval-") as tmp:
        hf_dir = side
        if weights != side:  # a tr1 Megatron checkpoint: export it to an HF folder the engine loads
            hf_dir = Path(tmp) / "hf"
            convert_mcore_to_hf(weights, hf_dir, progress=False)
        hf_config, tokenizer = load_hf_config_and_tokenizer(hf_dir, key)
        engine = make_engine(engine_kind, hf_config, tokenizer, backend, model_dir=str(hf_dir))
    return EnginePredictor(engine, PromptCache(tokenizer, hf_config, video), think=think, max_tokens=max_tokens,
                           name=name or model_dir.name, lenient=lenient)
