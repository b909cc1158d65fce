#!/bin/bash
# Qwen3-VL-8B GRPO on Charades (Temporal-R1 recipe, examples/qwen3_vl_8b_charades.yaml) on a SLURM
# cluster: 1 node(s) x 8 GPUs, TP 4 x PP 1 x DP 2 (from `tr1 plan`, see the YAML). Run from the repository root:
#   bash examples/qwen3_vl_8b_charades.sh [tr1 train arguments...]     e.g. optim.lr=2e-6 --stages grpo
# Needs the HF checkpoint in checkpoints/Qwen3-VL-8B-Instruct (no conversion: model.hf_dir loads HF weights)
# and the data under data/ (docs/cluster.md). Environment: NODES (default 1), TIME (per job, default 24:00:00),
# RUN_DIR, SBATCH_ARGS (e.g. "--partition=gpu --account=me"), SETUP (see examples/slurm/train.sbatch).
#
# What the eval job does, by hand (the trainer leaves each stage's final weights in RUN_DIR/stages/<stage>/model):
#   tr1 convert mcore-to-hf --mcore-dir $RUN_DIR/stages/grpo/model --out $RUN_DIR/hf/grpo
#   srun --gpus 1 examples/eval.sh $RUN_DIR/hf/grpo $RUN_DIR/eval/grpo   # tr1 eval --model on Charades-STA test
#                                                   # and ActivityNet val, with and without --no-think
set -euo pipefail

NODES=${NODES:-1}
TIME=${TIME:-24:00:00}
CONFIG=examples/qwen3_vl_8b_charades.yaml
RUN_DIR=${RUN_DIR:-runs/qwen3_vl_8b_charades}
HF_DIR=checkpoints/Qwen3-VL-8B-Instruct
read -r -a SBATCH_EXTRA <<< "${SBATCH_ARGS:-}"
mkdir -p logs  # SLURM does not create the --output folder

# 1. Train; the job requeues itself before each time limit and resumes (--resume auto) until RUN_DIR/DONE exists.
TRAIN_JOB=$(CONFIG=$CONFIG RUN_DIR=$RUN_DIR sbatch --parsable --job-name tr1-q3-8b --nodes "$NODES" --time "$TIME" \
    "${SBATCH_EXTRA[@]}" examples/slurm/train.sbatch "$@")
TRAIN_JOB=${TRAIN_JOB%%;*}
echo "train job $TRAIN_JOB: logs/tr1-q3-8b-$TRAIN_JOB.out, $RUN_DIR/logs/$TRAIN_JOB/, $RUN_DIR/stages/grpo/metrics.jsonl"

# 2. After training: export the final weights to HF (`tr1 convert mcore-to-hf`) and evaluate it
#    (`tr1 eval --model`, examples/eval.sh) into $RUN_DIR/eval/grpo/.
EVAL_JOB=$(RUN_DIR=$RUN_DIR sbatch --parsable --job-name tr1-q3-8b-eval --dependency "afterok:$TRAIN_JOB" \
    "${SBATCH_EXTRA[@]}" examples/slurm/eval.sbatch)
echo "export/eval job ${EVAL_JOB%%;*} (starts when $TRAIN_JOB completes)"

# 3. The untrained model on the same data (Temporal-R1's "base" row), in parallel with training.
if [[ "${BASE_EVAL:-1}" == 1 ]]; then
    BASE_JOB=$(MODEL_DIR=$HF_DIR OUT=runs/qwen3_vl_8b_base/eval sbatch --parsable --job-name tr1-q3-8b-base \
        "${SBATCH_EXTRA[@]}" examples/slurm/eval.sbatch)
    echo "base-model eval job ${BASE_JOB%%;*}: runs/qwen3_vl_8b_base/eval/"
fi
