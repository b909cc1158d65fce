"""The ``tr1`` console entry point.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and ``main(args) -> int``.
Modules are imported only when their subcommand runs, so ``tr1 --help`` is fast and a missing optional
dependency of one subcommand never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megatron_tr1.errors import UserError

# name -> (module, one-line help). Order is the order shown by ``tr1 --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_tr1.rl.train_cli", "train: base / SFT / GRPO stages (no --config: the embedded CPU demo)"),
    "make-synthetic": ("megatron_tr1.data.synthetic", "write a synthetic temporal-grounding dataset (videos + annotations)"),
    "eval": ("megatron_tr1.eval.evaluate", "evaluate a model or a trivial baseline: mIoU, R@0.3/0.5/0.7"),
    "convert": ("megatron_tr1.convert.cli", "convert checkpoints: hf-to-mcore / mcore-to-hf"),
    "verify": ("megatron_tr1.convert.verify", "compare Megatron and HF logits on the same input"),
    "plan": ("megatron_tr1.plan", "estimate per-GPU memory for TP/PP/DP layouts and recommend one"),
    "selftest": ("megatron_tr1.selftest.cli", "check every path this machine can run (--quick: CPU only)"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tr1",
        description="megatron-tr1: GRPO on Qwen2.5-VL for video temporal grounding (Temporal-R1) on megatron-core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {n:<16}{h}" for n, (_, h) in COMMANDS.items())
        + "\n\nRun `tr1 <subcommand> --help` for its options.",
    )
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="subcommand", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown subcommand {argv[0]!r}; choose from: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"tr1 {name}", description=help_text)
    module.add_arguments(sub)
    try:  # options and positional `section.field=value` overrides in any order
        args = sub.parse_intermixed_args(rest)
    except TypeError:  # argparse cannot intermix a parser with sub-commands (`tr1 convert`)
        args = sub.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UserError as e:  # a clear message, no traceback
        print(f"tr1 {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
