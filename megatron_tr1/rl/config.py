"""The ``tr1 train`` config: dataclasses whose defaults are the embedded CPU demo.

Load with ``load_train_config(path, overrides)`` (``megatron_tr1.config.load_config`` plus path resolution):
every field can be overridden as ``section.field=value``. Checks that need only the config run at
construction and raise ``ConfigError`` naming the field and value; ``check_layout(cfg, world_size)`` adds
the ones that need the number of ranks (data parallel size). Batch sizes count sequences (one prompt with
one response); a GRPO step samples ``rollout.prompts_per_step * rollout.n`` sequences and makes
``that / optim.global_batch_size`` optimizer updates on them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_tr1.config import load_config
from megatron_tr1.data.video import VideoBudget
from megatron_tr1.errors import ConfigError
from megatron_tr1.rewards import REWARDS

STAGES = ("base", "sft", "grpo", "grpo_no_think")


def _positive(section: object, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        if not (value > 0 or (allow_zero and value == 0)):  # also refuses nan
            raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _not_empty(section: object, *names: str, instead: str) -> None:
    """An empty string where a path goes would resolve to a folder (the working directory or the config's)."""
    for name in names:
        value = getattr(section, name)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{name}={value!r} is empty; {instead}")


@dataclass
class TinyModelConfig:
    """A tiny model built locally (used when ``model.hf_dir`` is unset): ``family`` "qwen2_5_vl" (the demo's) or
    "qwen3_vl" (Qwen3-VL's architecture: QK-norm, interleaved M-RoPE, timestamps, DeepStack)."""

    family: str = "qwen2_5_vl"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_depth: int = 1
    vision_hidden_size: int = 64
    vision_heads: int = 4
    patch_size: int = 14

    def __post_init__(self):
        if self.family not in ("qwen2_5_vl", "qwen3_vl"):
            raise ConfigError(f"model.tiny.family={self.family!r} must be qwen2_5_vl or qwen3_vl")
        _positive(self, *(f.name for f in dataclasses.fields(self) if f.name != "family"))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")


@dataclass
class ModelConfig:
    """Which model, what is trained, and the model-parallel layout."""

    hf_dir: str | None = None  # HF Qwen2.5-VL folder; None builds ``tiny`` (the demo)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    freeze_vision: bool = True  # the demo's tiny tower (random init) learns nothing useful; real recipes say false
    freeze_merger: bool = False
    freeze_llm: bool = False
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU, fp32 on CPU (backend.resolve)
    layer_spec: Literal["auto", "local", "te"] = "auto"  # auto: te on a GPU with transformer-engine, else local
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    recompute: Literal["none", "selective", "full"] = "none"  # activation recomputation (megatron-core)

    def __post_init__(self):
        _not_empty(self, "hf_dir", instead="give a Qwen2.5-VL folder or a tr1 checkpoint folder, or null for the "
                                           "tiny demo model")
        _positive(self, "tensor_parallel", "pipeline_parallel")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"recompute={self.recompute!r} must be one of none, selective, full")
        if self.freeze_vision and self.freeze_merger and self.freeze_llm:
            raise ConfigError("freeze_vision, freeze_merger and freeze_llm are all true: nothing would be trained")


@dataclass
class SyntheticConfig:
    """The synthetic dataset written under ``RUN_DIR/data`` when ``data.train`` is unset (``tr1 make-synthetic``)."""

    num: int = 512
    num_test: int = 128
    num_ood: int = 128
    num_pretrain: int = 4096  # other event kinds, for the base stage (0: the base stage learns the format only)
    seed: int = 0
    size: int = 112
    duration: list[float] = field(default_factory=lambda: [4.0, 4.0])  # video length range, seconds

    def __post_init__(self):
        _positive(self, "num", "size")
        _positive(self, "num_test", "num_ood", "num_pretrain", allow_zero=True)
        if len(self.duration) != 2 or not 1 <= self.duration[0] <= self.duration[1]:
            raise ConfigError(f"duration={self.duration} must be [LOW, HIGH] seconds with 1 <= LOW <= HIGH")


@dataclass
class DataSection:
    """Data configs (YAML, see ``data.dataset``; relative paths resolve against the train config's folder)."""

    train: str | None = None  # None: the synthetic data below
    test: str | None = None
    ood: str | None = None
    pretrain: str | None = None  # the base stage's grounding data (other events); None: synthetic's, if any, else
    # random-span answers on the train videos
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    video: VideoBudget = field(default_factory=VideoBudget)
    max_prompt_tokens: int = 512
    strict: bool = False  # False: skip bad records with one warning
    shuffle: bool = True
    cache_gb: float = 8.0  # decoded videos kept in host memory per rank (least recently used out; 0: none)

    def __post_init__(self):
        _not_empty(self, "train", "test", "ood", "pretrain",
                   instead="give the path of a data config YAML, or null (train: the synthetic data)")
        _positive(self, "max_prompt_tokens")
        _positive(self, "cache_gb", allow_zero=True)


@dataclass
class RolloutConfig:
    """Sampling ``n`` responses for each of ``prompts_per_step`` prompts (``rollout.engine.Sampling``)."""

    engine: Literal["hf", "vllm"] = "hf"
    tensor_parallel: int | None = None  # vLLM ranks per rollout replica (None: model.tensor_parallel); HF: always 1
    n: int = 8
    prompts_per_step: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    gpu_memory_utilization: float = 0.5  # vLLM only
    sync_bucket_bytes: int = 512 * 2**20  # weight sync: largest flat buffer of converted weights (rollout.weight_sync)
    max_num_seqs: int | None = None  # vLLM: sequences in flight per replica (None: vLLM's default); the rest queue

    def __post_init__(self):
        if self.n < 2:
            raise ConfigError(f"n={self.n}: GRPO normalises rewards within a group of n responses; use n >= 2")
        _positive(self, "prompts_per_step", "max_tokens")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 for GRPO (0 is greedy: no group spread)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        _positive(self, "sync_bucket_bytes")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs={self.max_num_seqs} must be >= 1 (or null: vLLM's default)")
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise ConfigError(f"tensor_parallel={self.tensor_parallel} must be >= 1 (or null: model.tensor_parallel)")
        if self.engine == "hf" and self.tensor_parallel not in (None, 1):
            raise ConfigError(f"tensor_parallel={self.tensor_parallel} is for the vLLM engine; the HF engine generates "
                              f"with the whole model on every rank (leave it null or 1)")


@dataclass
class AlgorithmConfig:
    """GRPO: advantages, loss terms, sampling filters and the reward."""

    norm_adv_by_std: bool = True  # False: Dr. GRPO-style advantages (reward - group mean)
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28  # clip-higher (DAPO); 0.2 is symmetric PPO
    clip_dual: float | None = None  # dual-clip bound for negative advantages (e.g. 3.0)
    kl_coef: float = 1e-2
    kl_type: Literal["k1", "k2", "low_var_kl"] = "low_var_kl"
    kl_in_reward: bool = False  # True: reward - kl_coef * sum KL, no KL term in the loss
    entropy_coef: float = 1e-3
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    agg_scope: Literal["update", "micro-batch"] = "update"  # micro-batch: EasyR1's (agg per micro-batch, averaged)
    loss_type: Literal["grpo", "gspo", "cispo"] = "grpo"  # see kernels.grpo_loss (gspo: clip_low/high 3e-4/4e-4)
    rollout_correction: Literal["none", "tis", "mis", "seq-mis"] = "none"  # engine-vs-trainer log-prob gap
    rollout_cap: float = 2.0
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, refill from the next prompts
    max_sampling_tries: int = 4  # rollout batches per step at most, when dynamic_sampling
    overlong_filter: bool = False  # mask responses cut at max_tokens (no <|im_end|>)
    think: bool = True  # the <think> prompt and format; False: answer only
    reward: str = "tvg"  # a key of rewards.REWARDS, used when think
    reward_no_think: str = "tvg_no_think"  # used when not think
    format_weight: float = 0.5  # overall = (1 - w) * accuracy + w * format

    def __post_init__(self):
        _positive(self, "adv_eps", "max_sampling_tries")
        _positive(self, "clip_low", "clip_high", "kl_coef", "entropy_coef", allow_zero=True)
        if self.clip_low >= 1:
            raise ConfigError(f"clip_low={self.clip_low} must be < 1 (the ratio is clipped to [1 - clip_low, ...])")
        if self.clip_dual is not None and self.clip_dual <= 1:
            raise ConfigError(f"clip_dual={self.clip_dual} must be > 1 (or null to disable dual clip)")
        if self.clip_dual is not None and self.loss_type != "grpo":
            raise ConfigError(f"clip_dual={self.clip_dual} is for loss_type=grpo only, not {self.loss_type}: set null")
        if not self.rollout_cap > 1:  # also refuses nan
            raise ConfigError(f"rollout_cap={self.rollout_cap!r} must be > 1 (algorithm.rollout_correction's bound)")
        for name in ("reward", "reward_no_think"):
            if getattr(self, name) not in REWARDS:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {sorted(REWARDS)}")
        if not 0 <= self.format_weight <= 1:
            raise ConfigError(f"format_weight={self.format_weight} must be in [0, 1]")

    def reward_name(self, think: bool | None = None) -> str:
        """The ``REWARDS`` key for ``think`` (default: ``self.think``)."""
        return self.reward if (self.think if think is None else think) else self.reward_no_think


@dataclass
class OptimConfig:
    """AdamW, gradient clipping, LR schedule and batch sizes (in sequences)."""

    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    warmup_steps: int = 10
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    micro_batch_size: int = 8
    global_batch_size: int = 64
    max_tokens_per_micro_batch: int = 0  # > 0: micro-batches of at most this many tokens (first-fit decreasing)
    packing: bool = True  # each micro-batch's sequences in one row, no padding (false: padded to the longest)
    # ... when padding would waste at least this share of the micro-batch's token slots (packing's gathers cost more
    # than a few percent of padding: the CPU demo's near-equal lengths ran 25% slower packed); 0: always pack
    packing_min_saving: float = 0.05
    balance_tokens: bool = True  # GRPO: whole groups change data-parallel ranks so each trains about as many tokens

    def __post_init__(self):
        _positive(self, "lr", "eps", "micro_batch_size", "global_batch_size")
        _positive(self, "min_lr", "weight_decay", "grad_clip", "warmup_steps", "max_tokens_per_micro_batch",
                  allow_zero=True)
        if not 0 <= self.packing_min_saving < 1:  # also refuses nan
            raise ConfigError(f"packing_min_saving={self.packing_min_saving!r} must be in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas={self.betas} must be two numbers in [0, 1)")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} > lr={self.lr}")


@dataclass
class StageConfig:
    """One training stage's budget: ``steps`` optimizer steps, or ``episodes`` passes over the train data."""

    enabled: bool = True
    steps: int = 0  # 0: derived from episodes
    episodes: float = 0.0
    lr: float | None = None  # None: optim.lr
    schedule: Literal["constant", "cosine", "linear"] | None = None  # None: optim.schedule
    global_batch_size: int | None = None  # None: optim.global_batch_size
    think: bool | None = None  # prompt with <think> (None: algorithm.think; grpo_no_think is always False)

    def __post_init__(self):
        _positive(self, "steps", "episodes", allow_zero=True)
        if self.enabled and self.steps == 0 and self.episodes == 0:
            raise ConfigError("an enabled stage needs steps > 0 or episodes > 0")
        if self.steps and self.episodes:
            raise ConfigError(f"steps={self.steps} and episodes={self.episodes} are both set; give one (the other 0): "
                              f"a stage's defaults set steps, so a budget in episodes needs steps: 0")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0 (or null for optim.lr)")
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise ConfigError(f"global_batch_size={self.global_batch_size} must be > 0 (or null)")

    def total_steps(self, num_samples: int, samples_per_step: int) -> int:
        """``steps``, or enough steps for ``episodes`` passes over ``num_samples`` (rounded up)."""
        return self.steps or math.ceil(self.episodes * num_samples / samples_per_step)


@dataclass
class StagesConfig:
    """The demo's protocol: base pretraining (grounding of other event kinds, the ``pretrain`` split; never the
    train split's labels), then SFT and GRPO from base.

    ``grpo`` prompts with ``algorithm.think`` and its reward; ``grpo_no_think`` always without think, with
    ``algorithm.reward_no_think``. A real run disables all but the stage it wants.
    """

    base: StageConfig = field(default_factory=lambda: StageConfig(steps=3200, lr=3e-3, global_batch_size=32))
    sft: StageConfig = field(default_factory=lambda: StageConfig(steps=800, lr=3e-3, global_batch_size=32,
                                                                 think=False))
    grpo: StageConfig = field(default_factory=lambda: StageConfig(steps=160, lr=5e-4))
    grpo_no_think: StageConfig = field(default_factory=lambda: StageConfig(steps=160, lr=5e-4))


@dataclass
class CheckpointConfig:
    """Atomic checkpoints (``rl.checkpoint``)."""

    dir: str | None = None  # None: RUN_DIR/checkpoints
    every: int = 0  # steps; 0: only at the end
    keep_last: int = 2  # 0: keep all
    resume: str | None = None  # "auto" (= "latest": the newest complete one, or a fresh start) or a step folder
    reset_optimizer: bool = False  # resuming at another TP x PP: reshard the weights, start the Adam moments fresh

    def __post_init__(self):
        _not_empty(self, "dir", "resume", instead="give a folder (resume: also 'auto'), or null")
        _positive(self, "every", "keep_last", allow_zero=True)


@dataclass
class LoggingConfig:
    """Where metrics go (``rl.logger``, ``rl.plots``)."""

    jsonl: bool = True  # RUN_DIR/metrics.jsonl
    tensorboard: bool = True  # RUN_DIR/tensorboard
    wandb: bool = False
    wandb_project: str = "megatron-tr1"
    plots: bool = True  # RUN_DIR/plots/*.png
    progress: bool = True
    max_nan_steps: int = 3  # stop after this many consecutive NaN losses

    def __post_init__(self):
        _positive(self, "max_nan_steps")


@dataclass
class EvalConfig:
    """Evaluation of each trained stage on ``data.test`` and ``data.ood`` (greedy)."""

    max_samples: int = 0  # 0: all
    every: int = 0  # steps between evaluations during training; 0: only at the end
    parser: Literal["answer", "lmms-eval"] = "answer"
    # also score each stage's final weights under the seed's protocols (eval.protocols): base and sft with its
    # custom inference, grpo with custom and R1 inference (the rows of the seed's table); results.json "protocols"
    seed_protocols: bool = True
    # VideoQA accuracy of each stage's final weights (eval/mvbench.py, custom inference) on MVBench-layout data
    # configs, or on the demo's synthetic mc_test / mc_ood splits when null; results.json "videoqa"
    videoqa: bool = True
    videoqa_test: str | None = None
    videoqa_ood: str | None = None

    def __post_init__(self):
        _positive(self, "max_samples", "every", allow_zero=True)


@dataclass
class TrainConfig:
    """``tr1 train``: every section; the defaults are the embedded CPU demo."""

    run_dir: str = "runs/demo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _not_empty(self, "run_dir", instead="give the output folder, e.g. runs/demo")
        longest = self.data.max_prompt_tokens + self.rollout.max_tokens
        if 0 < self.optim.max_tokens_per_micro_batch < longest:
            raise ConfigError(f"optim.max_tokens_per_micro_batch={self.optim.max_tokens_per_micro_batch} is less "
                              f"than data.max_prompt_tokens + rollout.max_tokens = {longest}: the longest sequence "
                              f"would not fit a micro-batch")
        rollout_tp = (self.rollout.tensor_parallel or 1) if self.rollout.engine == "vllm" else 1
        check_layout(self, world_size=math.lcm(self.model.tensor_parallel * self.model.pipeline_parallel,
                                               rollout_tp))  # the smallest world this layout fits

    def stage_batch(self, stage: str) -> int:
        """The global batch size (sequences per optimizer step) of ``stage``."""
        return getattr(self.stages, stage).global_batch_size or self.optim.global_batch_size


def check_layout(cfg: TrainConfig, world_size: int) -> int:
    """Check batch sizes against the parallel layout; returns the data-parallel size."""
    m, o = cfg.model, cfg.optim
    model_parallel = m.tensor_parallel * m.pipeline_parallel
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by model.tensor_parallel x "
                          f"model.pipeline_parallel = {m.tensor_parallel} x {m.pipeline_parallel}")
    dp = world_size // model_parallel
    rollout_tp = (cfg.rollout.tensor_parallel or m.tensor_parallel) if cfg.rollout.engine == "vllm" else 1
    if world_size % rollout_tp:
        raise ConfigError(f"rollout.tensor_parallel={rollout_tp} must divide the world size {world_size} (every rank "
                          f"runs one rollout worker: world / rollout.tensor_parallel replicas)")
    if cfg.rollout.prompts_per_step % dp:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the data "
                          f"parallel size {dp} (each rank samples its share of the prompts)")
    for stage in STAGES:
        if not getattr(cfg.stages, stage).enabled:
            continue
        batch = cfg.stage_batch(stage)
        where = f"stages.{stage}.global_batch_size" if getattr(cfg.stages, stage).global_batch_size else \
            "optim.global_batch_size"
        if batch % (o.micro_batch_size * dp):
            raise ConfigError(f"{where}={batch} must be divisible by optim.micro_batch_size x data parallel = "
                              f"{o.micro_batch_size} x {dp}")
        rollout = cfg.rollout.prompts_per_step * cfg.rollout.n
        if stage.startswith("grpo") and rollout % batch:
            raise ConfigError(f"rollout.prompts_per_step x rollout.n = {rollout} sequences per step must be a "
                              f"multiple of {where}={batch}")
    return dp


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML <- overrides. ``data.train/test/ood/pretrain`` relative to the YAML's folder are made absolute
    (as data configs resolve their own paths); ``run_dir``, ``model.hf_dir`` and ``checkpoint.dir`` stay relative
    to the working directory."""
    cfg = load_config(TrainConfig, path, overrides)
    if path is not None:
        base = Path(path).resolve().parent
        data = cfg.data
        for name in ("train", "test", "ood", "pretrain"):
            value = getattr(data, name)
            if value is not None and not Path(value).is_absolute():
                setattr(data, name, str(base / value))
    return cfg
