#!/bin/bash
# Evaluate an HF model folder on Charades-STA test (in domain) and ActivityNet-Captions val (out of domain),
# prompted with think and without (`--no-think`), or under the seed's protocols (MODES="custom r1": its custom
# and R1 inference, scored as its lmms-eval does), then print one table of mIoU and R@0.3/0.5/0.7.
#
#   examples/eval.sh MODEL_DIR [OUT_ROOT]
#     MODEL_DIR   an HF Qwen2.5-VL folder: a downloaded checkpoint (the base model) or one exported from a run
#                 with `tr1 convert mcore-to-hf` (examples/slurm/eval.sbatch does both steps); a run's
#                 RUN_DIR/stages/<stage>/model (tr1 Megatron layout) also works: tr1 eval converts it first
#     OUT_ROOT    default MODEL_DIR/eval; each (data, mode) gets OUT_ROOT/<data>-<mode>/ with predictions.jsonl,
#                 submission.json (lmms-eval layout) and metrics.json
#   Environment: DATASETS (default "charades_sta_test activitynet_val": names of examples/data/*.yaml),
#                MODES (default "think no-think"; also custom, r1: `tr1 eval --protocol custom|r1`),
#                PARSER (answer | lmms-eval, default answer; think and no-think only),
#                ENGINE (vllm | hf, default vllm), MAX_TOKENS (response budget, default 2048 as in training;
#                custom and r1: 4096 as the seed's lmms-eval model classes),
#                TRAIN_CONFIG (a train config whose data.video frame budget to use; default: tr1 eval's choice,
#                the run's config.yaml beside a stage's model folder, else Temporal-R1's 2 fps / 2048 tokens),
#                EVAL_ARGS (extra `tr1 eval` arguments, e.g. "--lenient").
# `tr1 eval --model` is one process on one GPU (greedy decoding): run it inside an allocation, e.g.
#   srun --gpus 1 examples/eval.sh runs/qwen2_5_vl_3b_charades/hf/grpo
# Reference (Temporal-R1, 3B, Charades-STA mIoU / ActivityNet mIoU): base 37.22 / 18.92, GRPO without think
# 51.10 / 22.10, GRPO with think 53.93 / 23.07.
set -euo pipefail

MODEL_DIR=${1:?usage: examples/eval.sh MODEL_DIR [OUT_ROOT]}
OUT_ROOT=${2:-$MODEL_DIR/eval}
DATASETS=${DATASETS:-charades_sta_test activitynet_val}
MODES=${MODES:-think no-think}
PARSER=${PARSER:-answer}
ENGINE=${ENGINE:-vllm}
TOKENS=${MAX_TOKENS:-2048}
read -r -a EXTRA <<< "${EVAL_ARGS:-}"
if [[ -n "${TRAIN_CONFIG:-}" ]]; then
    EXTRA=(--train-config "$TRAIN_CONFIG" "${EXTRA[@]}")
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ ! -f "$MODEL_DIR/config.json" && ! -f "$MODEL_DIR/tr1_mcore.json" ]]; then
    echo "examples/eval.sh: $MODEL_DIR has neither config.json nor tr1_mcore.json: pass an HF model folder or a" \
        "run's RUN_DIR/stages/<stage>/model" >&2
    exit 2
fi

RESULTS=()
for data in $DATASETS; do
    config="$HERE/data/$data.yaml"
    [[ -f "$config" ]] || { echo "examples/eval.sh: no data config $config" >&2; exit 2; }
    for mode in $MODES; do
        case "$mode" in
            think) flags=(--parser "$PARSER" --max-tokens "$TOKENS") ;;
            no-think) flags=(--no-think --parser "$PARSER" --max-tokens "$TOKENS") ;;
            custom|r1) flags=(--protocol "$mode" --max-tokens "${MAX_TOKENS:-4096}") ;;
            *) echo "examples/eval.sh: MODES: unknown mode '$mode' (think | no-think | custom | r1)" >&2; exit 2 ;;
        esac
        out="$OUT_ROOT/$data-$mode"
        echo "== $data, $mode -> $out"
        tr1 eval --model "$MODEL_DIR" --data "$config" "${flags[@]}" --engine "$ENGINE" --out "$out" "${EXTRA[@]}"
        RESULTS+=("$out")
    done
done

# One summary table over every metrics.json written above ("all" rows when a config mixes datasets).
python - "${RESULTS[@]}" <<'EOF'
import json
import sys
from pathlib import Path

print(f"\n| run | dataset | n | mIoU | R@0.3 | R@0.5 | R@0.7 |\n|---|---|---|---|---|---|---|")
for out in sys.argv[1:]:
    per = json.loads((Path(out) / "metrics.json").read_text())["metrics"]
    for name, m in per.items():
        if name == "all" and len(per) == 2:  # "all" repeats the single dataset
            continue
        cells = " | ".join(f"{m[k]:.2f}" for k in ("mIoU", "R@0.3", "R@0.5", "R@0.7"))
        print(f"| {Path(out).name} | {name} | {m['n']} | {cells} |")
EOF
