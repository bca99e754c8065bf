"""The package's structural rule, checked on every test run (docs/design.md section 7).

Imports point down only (errors/config -> modeling -> integration/data/metrics -> training | evaluation |
inference -> comparison | lifecycle -> cli, where ``|`` separates packages that may not import each other),
checked by import-linter's contracts in ``.importlinter``; ``modeling`` imports only torch, the standard library
and the package's bottom floor; no module imports another module's private (``_name``) name.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_tests_mirror_the_modules():
    """tests/<package>/test_<module>.py tests src/llama_expert/<package>/<module>.py, so a module's tests have one
    obvious place and a test file names what it tests: every package has a test folder, and every test file
    names a module (or package) of its folder's package. A few files test what the package does across its
    modules; they say so in WHOLE_PACKAGE_TESTS."""
    tests = ROOT / "tests"
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert [p for p in packages if not (tests / p).is_dir()] == []
    stray = []
    for test_file in sorted(tests.rglob("test_*.py")):
        folder = test_file.parent.relative_to(tests)
        if folder.parts and folder.parts[0] == "benchmarks":  # the scripts in benchmarks/, not the package
            continue
        name = test_file.stem[len("test_"):]
        source = PACKAGE.joinpath(*folder.parts)
        if not ((source / f"{name}.py").is_file() or (source / name).is_dir()
                or str(test_file.relative_to(tests)) in WHOLE_PACKAGE_TESTS):
            stray.append(str(test_file.relative_to(tests)))
    assert stray == [], f"test files that name no module of their folder's package: {stray}"


# test files that test a package across its modules (their name says what they check, not which module)
WHOLE_PACKAGE_TESTS = {
    "test_architecture.py",  # the import rules and this layout, over every module
    "test_shared_data.py",  # the tests' own guard for the shared data folder (conftest.py)
    "test_seed_surfaces.py",  # the seed's documented surfaces: ExpertModelBenchmark(model_path=...) and main.py
    "cli/test_token_never_written.py",  # every command run with --auth-token: no file, output or child argv holds it
    "integration/test_causality.py",  # every registered router in a Transformers model: causal, cached decoding exact
    "modeling/test_reference.py",  # every registered router and expert bank against its per-token formula
    "training/test_reliability.py",  # a new user's probe, pinned: checkpoints, locks, modes, signals, resume, data
}


def test_the_design_document_lists_every_module():
    """docs/design.md section 7 is the map of the package: a module missing from it is a module nobody can find."""
    design = (ROOT / "docs" / "design.md").read_text()
    section = design[design.index("## 7. Layout"):design.index("Further rules:")]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if path.name == "__init__.py":
            continue
        package = relative.parent.as_posix()
        listed = f"`{path.name}`" in section and (package == "." or f"`{package}/`" in section)
        if not listed:
            missing.append(relative.as_posix())
    assert missing == [], f"modules docs/design.md section 7 does not list: {missing}"
