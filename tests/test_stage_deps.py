"""Each stage's code deps in dvc.yaml are exactly the files of `pipeline/` it runs.

A file a stage imports but does not declare is a change DVC cannot see (a stale cached output);
a declared file it never imports reruns it for nothing. Imports are read from the source (every
`import` statement, at module level or inside a function, since a function-level import runs
when the stage calls it, but not under `if TYPE_CHECKING:`), with each package's `__init__.py` on
the way, and module names written as strings (the dataset sources `prepare` imports with
importlib) count too.
"""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
# Files under pipeline/ that are read as data by code that imports them.
DATA_READ_BY = {
    "pipeline/models/__init__.py": {"pipeline/models/configs/clipline-tiny.json"},  # open_clip.add_model_config
    "pipeline/preflight.py": {"pipeline/models/configs/clipline-tiny.json"},  # model names checked from JSON
}


def _module_file(name: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py; None outside the package."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    """Importing pipeline.a.b runs pipeline/__init__.py and pipeline/a/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _runtime_nodes(tree: ast.AST):
    """Every node, except what sits under `if TYPE_CHECKING:` (annotations only; never runs)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imported_names(path: Path) -> set[str]:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            # `from pipeline import io` imports the submodule pipeline.io
            names.update(f"{base}.{alias.name}" for alias in node.names if _module_file(f"{base}.{alias.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _module_file(node.value):
            names.add(node.value)  # importlib.import_module("pipeline.datasets.synthetic")
    return names


def stage_files(script: str) -> set[str]:
    """Every file under pipeline/ that `python -m <script>` runs or reads, relative to the project root."""
    seen: set[Path] = set()
    todo = [ROOT / script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            for parent in _with_parents(name):
                found = _module_file(parent)
                if found is not None and found not in seen:
                    todo.append(found)
    files = {str(p.relative_to(ROOT)) for p in seen}
    for source, data in DATA_READ_BY.items():
        if source in files:
            files |= data
    return files


def declared_files(deps: list) -> set[str]:
    """The stage's deps under pipeline/, folders expanded to the files DVC hashes in them."""
    files = set()
    for dep in deps:
        path = ROOT / dep
        if not dep.startswith("pipeline/"):
            continue
        if path.is_dir():
            files |= {str(p.relative_to(ROOT)) for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        else:
            files.add(dep)
    return files


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_declares_exactly_the_code_it_runs():
    problems = []
    for name, stage in _stages().items():
        script = "pipeline/" + stage["cmd"].split("pipeline.", 1)[1].split()[0] + ".py"
        runs, declared = stage_files(script), declared_files(stage["deps"])
        if runs - declared:
            problems.append(f"{name}: runs but does not declare {sorted(runs - declared)}")
        if declared - runs:
            problems.append(f"{name}: declares but never runs {sorted(declared - runs)}")
    assert not problems, "\n".join(problems)


def test_the_import_scan_sees_function_level_and_importlib_imports():
    prepare = stage_files("pipeline/prepare.py")
    assert "pipeline/datasets/cifar.py" in prepare  # importlib.import_module(SOURCES[...])
    assert "pipeline/retrieval/factory.py" in prepare  # imported inside preflight.check
    assert "pipeline/__init__.py" in prepare and "pipeline/retrieval/__init__.py" in prepare
    assert "pipeline/prepared.py" not in prepare  # preflight names it under TYPE_CHECKING only
    train = stage_files("pipeline/train.py")
    assert "pipeline/models/heads.py" in train and "pipeline/models/probe.py" not in train
    assert not any(f.startswith("pipeline/datasets/") for f in train)  # reads data/prepared, not raw sources
