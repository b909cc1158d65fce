#!/bin/bash
# Qwen2.5-VL-72B GRPO on Charades (Temporal-R1 recipe, examples/qwen2_5_vl_72b_charades.yaml) on a SLURM
# cluster: 8 node(s) x 8 GPUs, TP 4 x PP 8 x DP 2 with full recompute, rollout TP 8 (from `tr1 plan`, see the YAML).
# Run from the repository root:
#   bash examples/qwen2_5_vl_72b_charades.sh [tr1 train arguments...]     e.g. optim.lr=2e-6 --stages grpo
# Needs the HF checkpoint in checkpoints/Qwen2.5-VL-72B-Instruct (no conversion: model.hf_dir loads HF weights)
# and the data under data/ (docs/cluster.md). Environment: NODES (default 8; NODES=4 only with the YAML's 4-node
# settings: rollout.gpu_memory_utilization=0.27), TIME (per job, default 48:00:00), RUN_DIR, SBATCH_ARGS
# (e.g. "--partition=gpu --account=me"), SETUP (see examples/slurm/train.sbatch).
#
# What the eval job does, by hand (the trainer leaves each stage's final weights in RUN_DIR/stages/<stage>/model):
#   tr1 convert mcore-to-hf --mcore-dir $RUN_DIR/stages/grpo/model --out $RUN_DIR/hf/grpo
#   srun --gpus 1 examples/eval.sh $RUN_DIR/hf/grpo $RUN_DIR/eval/grpo   # tr1 eval --model on Charades-STA test
#                                                   # and ActivityNet val, with and without --no-think
set -euo pipefail

NODES=${NODES:-8}
TIME=${TIME:-48:00:00}
CONFIG=examples/qwen2_5_vl_72b_charades.yaml
RUN_DIR=${RUN_DIR:-runs/qwen2_5_vl_72b_charades}
read -r -a SBATCH_EXTRA <<< "${SBATCH_ARGS:-}"
mkdir -p logs  # SLURM does not create the --output folder

# 1. Train; the job requeues itself before each time limit and resumes (--resume auto) until RUN_DIR/DONE exists.
TRAIN_JOB=$(CONFIG=$CONFIG RUN_DIR=$RUN_DIR sbatch --parsable --job-name tr1-72b --nodes "$NODES" --time "$TIME" \
    "${SBATCH_EXTRA[@]}" examples/slurm/train.sbatch "$@")
TRAIN_JOB=${TRAIN_JOB%%;*}
echo "train job $TRAIN_JOB: logs/tr1-72b-$TRAIN_JOB.out, $RUN_DIR/logs/$TRAIN_JOB/, $RUN_DIR/stages/grpo/metrics.jsonl"

# 2. After training: export the final weights to HF (`tr1 convert mcore-to-hf`) into $RUN_DIR/hf/grpo/
#    (export only, SKIP_EVAL=1: see the end of this file).
EVAL_JOB=$(SKIP_EVAL=1 RUN_DIR=$RUN_DIR sbatch --parsable --job-name tr1-72b-eval --dependency "afterok:$TRAIN_JOB" \
    "${SBATCH_EXTRA[@]}" examples/slurm/eval.sbatch)
echo "export/eval job ${EVAL_JOB%%;*} (starts when $TRAIN_JOB completes)"

# No separate evaluation here (SKIP_EVAL=1 above): `tr1 eval` runs one process on one GPU, and the 147 GB of bf16
# weights of a 72B model (trained, or the base checkpoints/Qwen2.5-VL-72B-Instruct) do not fit one 80 GB GPU. The
# trainer's own end-of-stage evaluation (greedy, the stage's think mode, on data.test = Charades-STA test and
# data.ood = ActivityNet val, through the training job's rollout engine) is in $RUN_DIR/stages/grpo/eval/ and
# $RUN_DIR/results.json. Evaluate $RUN_DIR/hf/grpo in the other mode with a server that shards it over GPUs.
echo "72B: export only; the trainer's own evaluation: $RUN_DIR/results.json (see the end of $0)"
