"""Per-rank body of the mixed-task GRPO step test (one gloo rank, tiny model, fp32 on CPU)."""
import tempfile

import torch
import yaml

from megatron_tr1.data import synthetic
from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.rl.prompts import grounding_prompt
from tests.rl._step_cases import length_reward, step_config


def mixed_grpo_case(rank, world):
    """Two grounding and two multiple-choice prompts in one GRPO step: each group scored by its own task's reward,
    the step's metrics per task."""
    from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_model
    from megatron_tr1.distributed import init_parallel, wrap_ddp_and_optimizer
    from megatron_tr1.rl.grpo import grpo_step
    from megatron_tr1.rollout.hf_engine import HFEngine
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.testing.tiny_model import tiny_mcore_model

    init_parallel(1, 1)
    cfg = step_config(dynamic_sampling=False)
    cfg.rollout.prompts_per_step = 4
    hf, tokenizer, folder = tiny_hf_model(0), build_tiny_tokenizer(), tempfile.mkdtemp()
    synthetic.generate(folder, 2, num_test=0, num_ood=0, size=56, progress=False)
    config = {"datasets": [{"json_path": "train.json", "data_folder": "videos"},
                           {"json_path": "mc_train/which_event.json", "data_folder": "videos"}]}
    with open(f"{folder}/mixed.yaml", "w") as f:
        yaml.safe_dump(config, f)
    samples = load_samples(load_data_config(f"{folder}/mixed.yaml")).samples
    items = [grounding_prompt(s, cfg, tokenizer, hf.config) for s in samples]
    model, ref = tiny_mcore_model(hf).train(), tiny_mcore_model(hf)
    engine = HFEngine(hf.config, tokenizer)
    sync_weights(model, hf.config, engine, dtype=torch.float32)
    (policy,), optimizer = wrap_ddp_and_optimizer([model], cfg.optim.lr, 0.0, cfg.optim.grad_clip)
    metrics = grpo_step(policy, optimizer, engine, ref, items, cfg, tokenizer, hf.config, step=0,
                        reward_fn=length_reward)
    prompts = [tokenizer.decode(i.prompt.input_ids) for i in items]
    return {"metrics": metrics, "tasks": [i.task for i in items], "rewards": [i.reward for i in items],
            "gts": [i.gt for i in items], "prompts": prompts}


def mixed_run_case(rank, world, root):
    """``tr1 train`` (GRPO only) on a data config mixing grounding and both multiple-choice sub-tasks; returns the
    GRPO stage's metrics records and results.json."""
    import json
    from pathlib import Path

    from megatron_tr1.rl.train_cli import train
    from tests.rl._trainer_cases import run_dir_config

    data = Path(root, "data")
    synthetic.generate(data, 4, num_test=2, num_ood=0, size=56, progress=False)
    mixed = {"datasets": [{"json_path": "train.json", "data_folder": "videos"},
                          {"json_path": "mc_train/which_event.json", "data_folder": "videos"},
                          {"json_path": "mc_train/when_event.json", "data_folder": "videos", "task": "videoqa_mc"}]}
    (data / "mixed.yaml").write_text(yaml.safe_dump(mixed))
    run = Path(root, "run")
    train(run_dir_config(run, f"data.train={data}/mixed.yaml", f"data.test={data}/test.yaml", "data.ood=null",
                         "data.pretrain=null", "stages.base.enabled=false", "stages.sft.enabled=false",
                         "stages.grpo.steps=3", "rollout.prompts_per_step=4", "optim.global_batch_size=16",
                         "eval.seed_protocols=false"))
    records = [json.loads(line) for line in (run / "stages/grpo/metrics.jsonl").read_text().splitlines()]
    return {"records": records, "results": json.loads((run / "results.json").read_text())}
