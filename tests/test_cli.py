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
