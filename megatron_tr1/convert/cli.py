"""``tr1 convert hf-to-mcore | mcore-to-hf``: checkpoint conversion between HF and tr1 Megatron shards."""
from __future__ import annotations

import argparse
import resource
import time

from megatron_tr1.convert import mapping
from megatron_tr1.convert.hf_to_mcore import DEFAULT_SHARD_BYTES, DTYPES, convert_hf_to_mcore
from megatron_tr1.convert.mcore_to_hf import convert_mcore_to_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="{hf-to-mcore,mcore-to-hf}")
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> per-rank Megatron shards for TP x PP")
    a.add_argument("--hf-dir", required=True, help="directory written by save_pretrained (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory (written atomically)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    a.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast weights (default: keep stored dtype)")
    a.add_argument("--spec", choices=list(mapping.SPECS), default="local",
                   help="name spelling of fused-norm weights: local (default) or te (transformer-engine)")
    b = sub.add_parser("mcore-to-hf", help="tr1 Megatron shards -> HF safetensors (save_pretrained layout)")
    b.add_argument("--mcore-dir", required=True, help="directory written by `tr1 convert hf-to-mcore`")
    b.add_argument("--out", required=True, help="output directory (written atomically)")
    for p in (a, b):
        p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
        p.add_argument("--shard-size-mb", type=int, default=DEFAULT_SHARD_BYTES >> 20,
                       help="MiB of weights buffered before a safetensors file is written (default "
                            "%(default)s): the largest file (hf-to-mcore divides it among the TP ranks' files) "
                            "and the memory bound: peak RSS is about the import baseline + the largest tensor + "
                            "the larger of this and the largest tensor")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    shard_bytes = args.shard_size_mb << 20
    if args.direction == "hf-to-mcore":
        meta = convert_hf_to_mcore(args.hf_dir, args.out, args.tp, args.pp, args.dtype, args.spec, args.force,
                                   shard_bytes, progress=not args.no_progress)
        what = f"{len(meta.files)} rank(s), dtype {meta.dtype}"
    else:
        files = convert_mcore_to_hf(args.mcore_dir, args.out, args.force, shard_bytes,
                                    progress=not args.no_progress)
        what = f"{len(files)} safetensors file(s)"
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {args.out}: {what} in {time.perf_counter() - start:.1f}s, peak RSS {peak_mib:.0f} MiB")
    return 0
