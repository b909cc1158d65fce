#!/usr/bin/env bash
# tr1 Megatron per-rank shards (any TP x PP) -> HF safetensors in the save_pretrained layout
# (`tr1 convert mcore-to-hf`). One CPU process, streamed tensor by tensor.
#   tools/convert_mcore_to_hf.sh MCORE_DIR OUT [more tr1 options, e.g. --force --shard-size-mb 4096]
# SLURM:
#   sbatch -N1 -n1 -c8 --mem=64G -t 2:00:00 -o export-%j.log \
#     --wrap "tools/convert_mcore_to_hf.sh /ckpt/run42/policy_mcore /ckpt/run42/policy_hf"
set -euo pipefail
if [ $# -lt 2 ]; then awk 'NR > 1 && /^#/' "$0" >&2; exit 2; fi
mcore_dir=$1 out=$2
shift 2
exec "${PYTHON:-python}" -m megatron_tr1.cli convert mcore-to-hf --mcore-dir "$mcore_dir" --out "$out" "$@"
