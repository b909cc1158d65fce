"""Per-rank body of the data-parallel token balancing test: DP = 2, rank 0's responses long, rank 1's short."""
import torch

from tests.rl._step_cases import length_reward, setup, step_config

# response lengths per (data-parallel rank, prompt): rank 0's two groups 58 and 42 tokens, rank 1's 10 and 26
LENGTHS = {(0, 0): [16, 15, 14, 13], (0, 1): [12, 11, 10, 9], (1, 0): [1, 2, 3, 4], (1, 1): [5, 6, 7, 8]}


def _fixed_engine(hf_config, tokenizer, rank: int):
    from megatron_tr1.rollout.engine import Response, stop_token_id
    from megatron_tr1.rollout.hf_engine import HFEngine

    class FixedLengthEngine(HFEngine):
        """Real weights (synced), fixed response lengths per rank and prompt: ordinary token ids, then <|im_end|>."""

        def generate(self, prompts, n, sampling, seeds=None):
            stop, out = stop_token_id(self.tokenizer), []
            for p in range(len(prompts)):
                row = []
                for k, length in enumerate(LENGTHS[rank, p][:n]):
                    g = torch.Generator().manual_seed(1000 * rank + 10 * p + k)
                    ids = torch.randint(20, 500, (length,), generator=g).tolist()
                    ids[-1] = stop
                    row.append(Response(token_ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                        logprobs=[0.0] * length, finish_reason="stop"))
                out.append(row)
            return out

    return FixedLengthEngine(hf_config, tokenizer)


def balance_case(rank, world, balance: bool):
    """One GRPO step at DP = 2 with ``optim.balance_tokens`` = ``balance``: its metrics and the weights after it."""
    from megatron_tr1.distributed import wrap_ddp_and_optimizer
    from megatron_tr1.rl.grpo import grpo_step
    from megatron_tr1.rollout.weight_sync import sync_weights

    cfg = step_config(dynamic_sampling=False, kl_coef=0.0)
    cfg.optim.balance_tokens = balance
    hf, model, tokenizer, items, ref = setup(cfg)
    engine = _fixed_engine(hf.config, tokenizer, rank)
    sync_weights(model, hf.config, engine, dtype=torch.float32)
    (policy,), optimizer = wrap_ddp_and_optimizer([model], cfg.optim.lr, 0.0, cfg.optim.grad_clip)
    metrics = grpo_step(policy, optimizer, engine, ref, items, cfg, tokenizer, hf.config, step=0,
                        reward_fn=length_reward)
    params = {k: v.detach().clone().numpy() for k, v in policy.named_parameters()}
    return {"metrics": metrics, "params": params, "prompt": len(items[0].prompt.input_ids)}
