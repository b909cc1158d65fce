import re
import subprocess
import sys
from pathlib import Path

from megatron_tr1.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_subcommand_is_an_error(capsys):
    try:
        main(["nonsense"])
    except SystemExit as e:
        assert e.code == 2
    assert "unknown subcommand 'nonsense'" in capsys.readouterr().err


def test_train_overrides_may_stand_between_options(monkeypatch):
    """``tr1 train --run-dir D seed=1 --stages base x=y`` (plain argparse stops reading overrides at the second
    option and rejects the rest as unrecognized)."""
    from megatron_tr1.rl import train_cli

    seen = []

    def record(args):
        seen.append(args)
        return 0

    monkeypatch.setattr(train_cli, "main", record)
    assert main(["train", "--run-dir", "d", "seed=1", "--stages", "base", "stages.base.steps=3"]) == 0
    [args] = seen
    assert (args.run_dir, args.stages, args.overrides) == ("d", "base", ["seed=1", "stages.base.steps=3"])
    cfg = train_cli.build_config(args)
    assert (cfg.seed, cfg.stages.base.steps, cfg.stages.sft.enabled) == (1, 3, False)


def test_every_subcommand_module_exposes_the_interface():
    import importlib

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.main), name


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "megatron_tr1.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "make-synthetic" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(c for c in commands if c.rstrip().endswith("pytest"))
    assert test_cmd.strip() in ci
