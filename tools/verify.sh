#!/usr/bin/env bash
# Compare Megatron and HF logits on one text + video batch (`tr1 verify`). It starts its own TP x PP worker
# processes (NCCL on GPUs, gloo on CPU), so launch ONE task on a node with TP x PP GPUs. Last line printed:
# max_abs_logit_diff=<value>; exit status 1 above tolerance.
#   tools/verify.sh HF_DIR MCORE_DIR [TP PP] [more tr1 options, e.g. --dtype bfloat16 --spec te]
# SLURM (TP2 x PP2):
#   srun -N1 -n1 --gpus=4 -c16 -t 0:30:00 tools/verify.sh /ckpt/Qwen2.5-VL-3B-Instruct /ckpt/qwen3b_tp2_pp2 2 2
set -euo pipefail
if [ $# -lt 2 ]; then awk 'NR > 1 && /^#/' "$0" >&2; exit 2; fi
hf_dir=$1 mcore_dir=$2
shift 2
layout=()
if [ $# -ge 2 ] && [[ $1 =~ ^[0-9]+$ ]] && [[ $2 =~ ^[0-9]+$ ]]; then layout=(--tp "$1" --pp "$2"); shift 2; fi
exec "${PYTHON:-python}" -m megatron_tr1.cli verify --hf-dir "$hf_dir" --mcore-dir "$mcore_dir" "${layout[@]}" "$@"
