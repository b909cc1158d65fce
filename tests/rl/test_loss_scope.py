"""How the GRPO step weighs its micro-batches (``rl.grpo.micro_batch_weights`` + ``grpo_loss_fn``), on ragged
micro-batches without a model: ``algorithm.agg_scope=update`` is ``agg`` over the whole update however it is cut
(also with GSPO and masked importance sampling, whose kept tokens decide the weights), ``micro-batch`` is EasyR1's
formula (token-mean within each micro-batch, divided by the number of accumulation steps)."""
import pytest
import torch

from kernels import reference
from megatron_tr1.rl.config import AlgorithmConfig
from megatron_tr1.rl.grpo import grpo_loss_fn, micro_batch_weights

from tests.rl._step_cases import step_config

SIZES = [(3, 9), (1, 4), (4, 13)]  # (sequences, width) per micro-batch: ragged


def micro_batches(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, width in SIZES:
        lengths = torch.randint(1, width + 1, (rows,), generator=g)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        lp = 0.5 * torch.randn(rows, width, dtype=torch.float64, generator=g) - 1
        old = lp + 0.3 * torch.randn(rows, width, dtype=torch.float64, generator=g)
        out.append({"lp": lp, "old_logprobs": old, "loss_mask": mask,
                    "rollout_logprobs": old + 0.6 * torch.randn(rows, width, dtype=torch.float64, generator=g),
                    "ref": lp + 0.3 * torch.randn(rows, width, dtype=torch.float64, generator=g),
                    "advantages": torch.randn(rows, dtype=torch.float64, generator=g)})
    out[1]["rollout_logprobs"] = out[1]["old_logprobs"] + 2.0  # seq-MIS drops this whole micro-batch
    return out


def step_loss(batches: list[dict], cfg) -> tuple[float, list[torch.Tensor]]:
    """sum over micro-batches of grpo_loss_fn's weighted loss, and d / d logprobs per micro-batch."""
    lps = [b["lp"].clone().requires_grad_() for b in batches]
    for b, w in zip(batches, micro_batch_weights(batches, cfg)):
        b["weight"] = w
    total = sum(grpo_loss_fn(b, (lp, torch.zeros_like(lp)), cfg)[0] for b, lp in zip(batches, lps))
    total.backward()
    return total.item(), [lp.grad for lp in lps]


def config(**algorithm):
    cfg = step_config(dynamic_sampling=False, entropy_coef=0.0, kl_coef=0.05, kl_type="k2", clip_high=0.28,
                      **algorithm)
    cfg.rollout.max_tokens = 16
    return cfg


def padded(batches: list[dict], key: str) -> torch.Tensor:
    width = max(b[key].shape[1] for b in batches)
    return torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1])) for b in batches])


def test_micro_batch_scope_is_easyr1s_formula():
    batches = micro_batches()
    loss, grads = step_loss(batches, config(agg_scope="micro-batch"))
    # EasyR1's update_policy: loss = (masked_mean(pg) + kl_coef * masked_mean(kl)) / gradient_accumulation per
    # micro-batch, written out here in float64
    want, want_grads = 0.0, []
    for b in batches:
        lp = b["lp"].clone().requires_grad_()
        m, a = b["loss_mask"].double(), b["advantages"][:, None]
        r = torch.exp(lp - b["old_logprobs"])
        pg = torch.maximum(-a * r, -a * torch.clamp(r, 0.8, 1.28))
        kl = 0.5 * (lp - b["ref"]) ** 2
        part = ((pg * m).sum() / m.sum() + 0.05 * (kl * m).sum() / m.sum()) / len(batches)
        part.backward()
        want += part.item()
        want_grads.append(lp.grad)
    assert loss == pytest.approx(want, rel=1e-12)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    # on ragged micro-batches it is not the token-mean over the update
    assert abs(step_loss(micro_batches(), config())[0] - loss) > 1e-3


@pytest.mark.parametrize("algorithm", [dict(), dict(agg="seq-mean-token-sum-norm"),
                                       dict(loss_type="gspo", rollout_correction="seq-mis"),
                                       dict(loss_type="cispo", rollout_correction="mis"),
                                       dict(rollout_correction="tis", agg="seq-mean-token-mean")])
def test_update_scope_is_agg_over_the_whole_update(algorithm):
    batches = micro_batches()
    cfg = config(**algorithm)
    if cfg.algorithm.loss_type == "gspo":  # its micro-batches are weighted for its policy term (seq-mean-token-mean):
        cfg.algorithm.kl_coef = 0.0  # a token-mean KL term is then a per-micro-batch one weighted by sequences
    loss, grads = step_loss(batches, cfg)
    a = cfg.algorithm
    lp = padded(batches, "lp").requires_grad_()
    rollout = padded(batches, "rollout_logprobs")
    want, _ = reference.grpo_loss(lp, padded(batches, "old_logprobs"), torch.cat([b["advantages"] for b in batches]),
                                  padded(batches, "loss_mask"), ref_logprobs=padded(batches, "ref"),
                                  clip_high=a.clip_high, kl_coef=a.kl_coef, kl_type=a.kl_type, agg=a.agg,
                                  loss_type=a.loss_type, rollout_logprobs=rollout,
                                  rollout_correction=a.rollout_correction, rollout_cap=a.rollout_cap,
                                  agg_norm_len=cfg.rollout.max_tokens)
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-10)
    start = 0
    for b, got in zip(batches, grads):
        rows, width = b["lp"].shape
        torch.testing.assert_close(got, lp.grad[start:start + rows, :width], rtol=1e-10, atol=1e-14)
        start += rows


def test_options_are_checked_by_name():
    from megatron_tr1.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout_cap=1.0 must be > 1"):
        AlgorithmConfig(rollout_cap=1.0)
    with pytest.raises(ConfigError, match="clip_dual=3.0 is for loss_type=grpo only, not gspo"):
        AlgorithmConfig(loss_type="gspo", clip_dual=3.0)
