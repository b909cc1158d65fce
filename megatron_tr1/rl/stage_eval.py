"""Greedy evaluation inside ``tr1 train``: each stage's final weights on the test and ood splits, and (with
``eval.every``) the current weights on the test split during training.

The engine holds the weights to evaluate (the trainer syncs them first). Every rank calls the evaluator: with
the rollout placement each replica answers its slice of the split and every rank gets all the answers
(``RolloutPlacement.generate_shared``); the first rank writes the files. A video that cannot be decoded is left out
(warned, counted). Both prompt modes' predictors share the trainer's ``data.prompt_cache.PromptCache``: a video is
decoded once while it is kept, for every stage and mode.

With ``eval.seed_protocols`` the final weights are also scored as the seed's table scores them (``SEED_PROTOCOLS``:
base and sft with its custom inference; grpo, trained with think, with custom and R1 inference; ``eval.protocols``),
under ``results["protocols"][protocol][split]`` and ``out/<split>-<protocol>/``.
"""
from __future__ import annotations

from pathlib import Path

from megatron_tr1.data.annotations import Sample
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.data.prompt_cache import PromptCache

METRICS = ("mIoU", "R@0.3", "R@0.5", "R@0.7")
SEED_PROTOCOLS = {"base": ("custom",), "sft": ("custom",), "grpo": ("custom", "r1")}  # the seed's table's rows


class StageEvaluator:
    """Evaluates the ``engine``'s weights on ``samples["test"]`` / ``samples["ood"]`` (``eval.max_samples``
    each); collective over every rank."""

    def __init__(self, cfg: TrainConfig, engine, samples: dict[str, list[Sample]], cache: PromptCache):
        self.cfg, self.engine, self.samples, self.cache = cfg, engine, samples, cache
        self._predictors: dict[bool | str, object] = {}  # prompt mode -> EnginePredictor

    def samples_of(self, split: str) -> list[Sample]:
        samples = self.samples.get(split) or []
        return samples[: self.cfg.eval.max_samples] if self.cfg.eval.max_samples else samples

    def predictor(self, think: bool | str, progress: bool):
        from megatron_tr1.eval.model_predictor import EnginePredictor

        if think not in self._predictors:
            self._predictors[think] = EnginePredictor(self.engine, self.cache, think=think,
                                                      max_tokens=self.cfg.rollout.max_tokens, lenient=True)
        predictor = self._predictors[think]
        predictor.progress = progress
        return predictor

    def during_training(self, think: bool) -> dict[str, float]:
        """``eval/test/{mIoU,R@0.3,R@0.5,R@0.7}`` of the engine's weights (no files written, no RNG drawn)."""
        from megatron_tr1.eval.evaluate import score, summarize

        samples = self.samples_of("test")
        if not samples:
            return {}
        rows = score(samples, self.predictor(think, progress=False).predict(samples), self.cfg.eval.parser)
        metrics = summarize(rows)["all"]
        return {f"eval/test/{k}": metrics[k] for k in METRICS}

    def final(self, stage: str, think: bool, out: Path, write: bool = True) -> dict:
        """``{split: metrics}`` of the engine's weights on test and ood; with ``write`` (the first rank) the
        predictions, the lmms-eval submission and the metrics go to ``out/<split>/``."""
        from megatron_tr1.eval.evaluate import score, summarize, write_outputs

        results = {}
        for split in ("test", "ood"):
            samples = self.samples_of(split)
            if not samples:
                continue
            predictor = self.predictor(think, progress=self.cfg.logging.progress and write)
            predictor.name = stage
            rows = score(samples, predictor.predict(samples), self.cfg.eval.parser)
            metrics = summarize(rows)
            if write:
                write_outputs(out / split, rows, {"stage": stage, "think": think, "split": split,
                                                  "skipped_undecodable": len(samples) - len(rows),
                                                  "metrics": metrics})
            results[split] = metrics["all"]
        protocols = SEED_PROTOCOLS.get(stage, ()) if self.cfg.eval.seed_protocols else ()
        for protocol in protocols:
            results.setdefault("protocols", {})[protocol] = self.protocol(stage, protocol, out, write)
        for split in ("mc_test", "mc_ood") if self.cfg.eval.videoqa else ():
            if self.samples_of(split):
                results.setdefault("videoqa", {})[split] = self.videoqa(stage, split, out, write)
        return results

    def videoqa(self, stage: str, split: str, out: Path, write: bool) -> dict:
        """Multiple-choice accuracy of the engine's weights on ``split`` as ``tr1 eval --task mvbench --protocol
        custom`` scores it (``eval.mvbench``); with ``write`` the rows and metrics go to ``out/<split>/``."""
        from megatron_tr1.eval import mvbench

        samples = self.samples_of(split)
        predictor = self.predictor(mvbench.prompt_mode("custom"), progress=self.cfg.logging.progress and write)
        predictor.name = f"{stage} (videoqa)"
        rows = mvbench.score(samples, predictor.predict([mvbench.as_prompt_sample(s, "custom") for s in samples]),
                             "custom")
        metrics = mvbench.summarize(rows)
        if write:
            mvbench.write_outputs(out / split, rows, metrics)
        return metrics["overall"]

    def protocol(self, stage: str, protocol: str, out: Path, write: bool) -> dict:
        """``{split: metrics}`` of the engine's weights under the seed's ``protocol`` (its prompt, its stored
        answer, its scorer); with ``write`` the files go to ``out/<split>-<protocol>/``."""
        from megatron_tr1.eval.evaluate import as_submitted, score, summarize, write_outputs

        results = {}
        for split in ("test", "ood"):
            samples = self.samples_of(split)
            if not samples:
                continue
            predictor = self.predictor(protocol, progress=self.cfg.logging.progress and write)
            predictor.name = f"{stage} ({protocol})"
            rows = score(samples, predictor.predict(samples), protocol=protocol)
            metrics = summarize(as_submitted(rows))
            if write:
                write_outputs(out / f"{split}-{protocol}", rows, {"stage": stage, "protocol": protocol,
                                                                   "split": split, "metrics": metrics})
            results[split] = metrics["all"]
        return results
