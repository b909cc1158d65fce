"""The package's layers (../shared/design.md): imports point one way, test support stays out of production, the
rollout engines do not import each other."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_tr1"
KERNELS = PACKAGE.parent / "kernels"

# top-level part -> the parts it may import (besides itself). Leaves: errors, config, backend (and cpu, backend's).
LEAVES = {"errors", "config", "backend"}
# leaf modules inside a part, importable from every part: models.family (which family a config is) imports errors only
LEAF_MODULES = {"megatron_tr1.models.family"}
ALLOWED = {
    "errors": set(), "config": {"errors"}, "backend": {"errors", "cpu"}, "cpu": set(),
    "torchvision_cpu": set(),
    "rewards": LEAVES,
    "data": LEAVES,
    "models": LEAVES | {"data"},
    "distributed": LEAVES, "launch": LEAVES,
    "convert": LEAVES | {"models", "data", "distributed", "launch"},
    "plan": LEAVES | {"models"},
    "demo": LEAVES | {"data"},
    "rollout": LEAVES | {"data", "models", "convert", "distributed", "torchvision_cpu"},
    "eval": LEAVES | {"data", "models", "convert", "rollout", "rewards"},
    "tasks": LEAVES | {"data", "rewards", "eval"},
    "rl": LEAVES | {"data", "models", "convert", "rollout", "eval", "rewards", "distributed", "launch", "demo",
                    "plan", "tasks"},
    "selftest": LEAVES | {"data", "models", "convert", "rollout", "eval", "rewards", "distributed", "launch",
                         "demo", "rl", "tasks"},
    "cli": LEAVES | {"selftest", "rl", "eval", "convert", "data", "plan"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _production():
    return [p for p in PACKAGE.rglob("*.py") if _part(p) != "testing" and p.name != "__init__.py" or
            (p.name == "__init__.py" and _part(p) not in ("testing", "__init__"))]


def test_imports_point_one_way():
    bad = []
    for path in _production():
        part = _part(path)
        for line, module in _imports(path):
            if not module.startswith("megatron_tr1.") or module in LEAF_MODULES:
                continue
            target = module.split(".")[1]
            if target != part and target not in ALLOWED[part]:
                bad.append(f"{path.relative_to(PACKAGE)}:{line} ({part}) imports {module}")
    assert not bad, "\n".join(bad)


def test_leaf_modules_import_only_leaves():
    for module in LEAF_MODULES:
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        bad = [m for _, m in _imports(path) if m.startswith("megatron_tr1.") and m.split(".")[1] not in LEAVES]
        assert not bad, f"{module} must stay a leaf: it imports {bad}"


def test_no_production_import_of_test_support():
    bad = [f"{p.relative_to(PACKAGE)}:{line}" for p in _production() for line, m in _imports(p)
           if m.startswith("megatron_tr1.testing")]
    bad += [f"tools/{p.name}:{line}" for p in (PACKAGE.parent / "tools").glob("*.py") for line, m in _imports(p)
            if m.startswith("megatron_tr1.testing")]
    assert not bad, bad


def test_kernels_stand_alone():
    bad = [f"{p.name}:{line}" for p in KERNELS.glob("*.py") for line, m in _imports(p)
           if m.startswith("megatron_tr1")]
    assert not bad, bad


def test_engines_do_not_import_each_other():
    rollout = PACKAGE / "rollout"
    mods = {p.stem: {m for _, m in _imports(p)} for p in rollout.glob("*.py")}
    assert not {"megatron_tr1.rollout.hf_engine", "megatron_tr1.rollout.vllm_engine",
                "megatron_tr1.rollout.factory"} & mods["engine"]
    assert "megatron_tr1.rollout.vllm_engine" not in mods["hf_engine"]
    assert "megatron_tr1.rollout.hf_engine" not in mods["vllm_engine"]


def test_cpu_stand_in_is_imported_by_the_backend_only():
    users = {str(p.relative_to(PACKAGE)) for p in _production() for _, m in _imports(p)
             if m.startswith("megatron_tr1.cpu") and _part(p) != "cpu"}
    assert users == {"backend.py"}


def test_files_stay_small():
    big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 420}
    assert not big, big
