"""dvc.yaml's code deps are exactly what each stage imports, and the shared modules stay apart.

Each stage's import closure is derived from the code: every `stages.*` module its file imports
(at the top or inside a function), then what those import, and so on. A stage must list exactly
those files in `deps:`, so that editing a shared module re-runs the stages that use it, and only
those. Data deps (anything that is not a .py file) are not checked here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stages"
COMMANDS = ("predict", "serve")  # entry points that are not DVC stages
# The one stage that may import another: isic2018 fetches through download's verified path (one downloader).
STAGE_MAY_IMPORT = {"stages/isic2018.py": {"stages/download.py"}}
# Shared modules and the project modules each may import (besides cli, whose errors any may raise).
SHARED_MAY_IMPORT = {
    "stages/lib/dataset.py": set(),
    "stages/lib/cli.py": set(),
    "stages/lib/params.py": set(),
    "stages/lib/files.py": set(),
    "stages/lib/images.py": set(),
    "stages/lib/progress.py": set(),
    "stages/lib/shards.py": {"stages/lib/files.py"},  # index.json is read by the one JSON reader
    "stages/lib/checkpoint.py": {"stages/lib/files.py"},  # saved whole with files.atomic_dir
}


def module_file(name: str) -> Path | None:
    """stages/x.py for module `stages.x` (None for the package itself or a non-project module)."""
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    path = ROOT.joinpath(*parts).with_suffix(".py")
    return path if path.is_file() else None


def direct_imports(path: Path) -> set[str]:
    """Project files that `path` imports: `import stages.x`, `from stages.x import ...`, `from stages import x`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import; use `from stages.x import ...`")
        for name in names:
            target = module_file(name)
            if target is not None and target != path:
                found.add(target.relative_to(ROOT).as_posix())
    return found


def closure(relative: str) -> set[str]:
    """`relative` and every project file it imports, transitively."""
    seen, todo = set(), [relative]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(direct_imports(ROOT / current) - seen)
    return seen


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_module(stage: dict) -> str:
    cmd = stage["cmd"].split()
    assert cmd[:3] == ["python", "-m", cmd[2]] and cmd[2].startswith(f"{PACKAGE}."), stage["cmd"]
    return cmd[2].replace(".", "/") + ".py"


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if str(d).endswith(".py")}


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_dvc_code_deps_are_exactly_the_import_closure(name):
    stage = dvc_stages()[name]
    expected = closure(stage_module(stage))
    listed = code_deps(stage)
    assert listed == expected, (
        f"dvc.yaml stage {name}: deps list {sorted(listed)}, but the code imports {sorted(expected)} "
        f"(missing: {sorted(expected - listed)}; not imported: {sorted(listed - expected)})")


def test_train_does_not_depend_on_the_image_decoder():
    stage = dvc_stages()["train"]
    assert "stages/lib/images.py" not in closure(stage_module(stage)), "train reads shards, never image files"


@pytest.mark.parametrize("module", sorted(SHARED_MAY_IMPORT))
def test_a_shared_module_does_not_pull_in_the_others(module):
    allowed = {module, "stages/lib/cli.py"} | SHARED_MAY_IMPORT[module]
    assert closure(module) <= allowed, f"{module} imports {sorted(closure(module) - allowed)}"


def test_no_stage_imports_another_stage():
    stage_files = {stage_module(s) for s in dvc_stages().values()}
    for module in sorted(stage_files):
        others = closure(module) & stage_files - {module} - STAGE_MAY_IMPORT.get(module, set())
        assert not others, f"{module} imports stage(s) {sorted(others)}: move what they share to a module"


def test_every_project_module_is_in_some_closure_or_is_a_command():
    """A module no stage imports is dead code or a command (predict, serve); catch stale leftovers."""
    used = set().union(*(closure(stage_module(s)) for s in dvc_stages().values()),
                       *(closure(f"stages/{command}.py") for command in COMMANDS))
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("*.py") if p.name != "__init__.py"}
    assert files <= used, f"not imported by any stage or command: {sorted(files - used)}"
