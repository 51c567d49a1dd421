"""The house's seams, checked from the source: what each layer may import."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launcher_imports(path: Path) -> set[str]:
    """Every launcher module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == "launcher" or n.startswith("launcher."))
    return found


def test_configuration_is_the_ground_floor():
    """launcher/config/ (schema, loading, rules, where the shipped assets are) imports nothing of the launcher
    but itself and its error types: checks that load things live above it (launcher/preflight.py)."""
    outside = {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / "launcher" / "config").glob("*.py")
               for m in launcher_imports(p) if not (m.startswith("launcher.config") or m == "launcher.errors")}
    assert not outside, sorted(outside)


def test_tests_share_helpers_through_helper_modules_not_through_each_other():
    """Shared launches, fixtures and checks live in helper modules (tests/helpers.py, tests/slurm_cluster.py,
    tests/memory_probe.py) and conftest.py; a test module or a benchmark importing a test module pulls in its
    tests and its module-level setup."""
    importers = [*(ROOT / "tests").glob("test_*.py"), *(ROOT / "benchmarks").glob("*.py")]
    crossing = {f"{p.name}: {m}" for p in importers
                for m in _test_imports(p) if m.startswith("tests.test_") and m != f"tests.{p.stem}"}
    assert not crossing, sorted(crossing)


def _test_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_module_imports_another_s_private_helpers():
    """What two modules share is public in one of them (run files are read through launcher.outputs.run_files):
    a `_name` imported from elsewhere is a seam nobody named."""
    reached = set()
    for path in (ROOT / "launcher").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("launcher"):
                reached |= {f"{path.relative_to(ROOT)}: {node.module}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_")}
    assert not reached, sorted(reached)
