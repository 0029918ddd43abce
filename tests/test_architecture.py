"""The floors contract (docs/ARCHITECTURE.md): no package imports one on a higher floor, not even inside a function."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: floor of each package: a module may import its own package and packages on lower floors only.
FLOORS = {"core": 0, "quant": 1, "runtime": 2, "registry": 2, "analyzer": 3, "validation": 3, "quantgate": 4,
          "tasks": 5}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import statement in `source`, at any depth (functions included)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def upward_imports() -> list[str]:
    bad = []
    for pkg, floor in FLOORS.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, mod in imported_modules(path.read_text(encoding="utf-8")):
                top = mod.split(".")[0]
                if top in FLOORS and top != pkg and FLOORS[top] >= floor:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {pkg} (floor {floor}) imports {mod} "
                               f"(floor {FLOORS[top]})")
    return bad


def test_the_parser_sees_imports_inside_functions():
    src = "import os\ndef f():\n    from quantgate.jobs import run_job\n    import tasks.tasks\n"
    assert [m for _, m in imported_modules(src)] == ["os", "quantgate.jobs", "tasks.tasks"]


def test_no_package_imports_a_higher_or_sibling_floor():
    assert upward_imports() == []


def test_every_package_has_a_floor():
    pkgs = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks", "scripts"}
    assert pkgs == set(FLOORS)


def test_import_linter_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency (pyproject.toml [test])"
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
