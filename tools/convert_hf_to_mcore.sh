#!/usr/bin/env bash
# HF Qwen2.5-VL checkpoint -> tr1 Megatron per-rank shards for TP x PP (`tr1 convert hf-to-mcore`).
# One CPU process; it streams tensor by tensor, so a node with less RAM than the model is enough.
#   tools/convert_hf_to_mcore.sh HF_DIR OUT TP PP [more tr1 options, e.g. --dtype bfloat16 --force]
# SLURM:
#   sbatch -N1 -n1 -c8 --mem=64G -t 2:00:00 -o convert-%j.log \
#     --wrap "tools/convert_hf_to_mcore.sh /ckpt/Qwen2.5-VL-72B-Instruct /ckpt/qwen72b_tp8_pp4 8 4 --dtype bfloat16"
set -euo pipefail
if [ $# -lt 4 ]; then awk 'NR > 1 && /^#/' "$0" >&2; exit 2; fi
hf_dir=$1 out=$2 tp=$3 pp=$4
shift 4
exec "${PYTHON:-python}" -m megatron_tr1.cli convert hf-to-mcore --hf-dir "$hf_dir" --out "$out" --tp "$tp" --pp "$pp" "$@"
