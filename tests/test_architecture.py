"""The package's structural rule, checked on every test run (README "Architecture").

Imports point down only (errors/config -> modeling -> integration/data -> training/evaluation/inference
-> cli), checked by import-linter's contracts in ``.importlinter``; ``modeling`` imports only torch, the
standard library and the package's bottom floor; no module imports another module's private (``_name``) name.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "llama_expert"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts), parts[-1] == "__init__"


def _imports(path: Path, module: str, is_package: bool):
    """(imported module, names) for every import statement, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [alias.name for alias in node.names]


def test_import_linter_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is part of the test extra: pip install -e '.[test]'"
    done = subprocess.run([lint, str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, env={"PYTHONPATH": str(PACKAGE.parent), "PATH": ""})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_module_imports_another_modules_private_name():
    offences = []
    for path, module, is_package in _modules():
        for source, names in _imports(path, module, is_package):
            if source.startswith("llama_expert") and source != module:
                offences += [f"{module} imports {source}.{n}" for n in names
                             if n.startswith("_") and not n.endswith("__")]
    assert not offences, "private names are private to their module: " + "; ".join(offences)


def test_modeling_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    offences = []
    for path, module, is_package in _modules():
        if not module.startswith("llama_expert.modeling"):
            continue
        for source, _ in _imports(path, module, is_package):
            top = source.split(".")[0]
            if top == "llama_expert":
                if source.split(".")[1] not in ("modeling", "errors", "config", "options", "files"):
                    offences.append(f"{module} imports {source}")
            elif top not in allowed:
                offences.append(f"{module} imports {source}")
    assert not offences, "; ".join(offences)


@pytest.mark.parametrize("floor", ["modeling", "integration", "data", "training", "evaluation", "inference",
                                   "lifecycle", "cli"])
def test_every_floor_has_a_test_folder(floor):
    """Tests mirror the layout, so a new module has an obvious place for its tests."""
    assert (ROOT / "tests" / floor).is_dir()
