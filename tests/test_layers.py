"""The layer rules of docs/ARCHITECTURE.md, read from every Python file's imports (``ast``, no
import is executed):

* ``unclip/`` imports only torch and the standard library: the model library runs anywhere;
* ``ray`` is imported only in ``pipeline/``, ``jobs/``, ``bench/`` and ``tests/``;
* ``pipeline/`` never imports ``jobs/`` (the command line sits on top of the pipeline);
* no module uses another module's private (``_name``) names.

Each rule is also run on a snippet that breaks it, so a rule that cannot fail is caught here too.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("unclip", "pipeline", "jobs", "bench")
RAY_ALLOWED = ("pipeline", "jobs", "bench", "tests")


def _sources() -> list[Path]:
    skip = {".venv", ".git", "runs", "build", "dist", ".helpers"}
    return sorted(
        p for p in PROJECT.rglob("*.py") if not skip.intersection(p.relative_to(PROJECT).parts[:1])
    )


def _imports(tree: ast.AST) -> Iterator[tuple[int, str, str | None, str]]:
    """(line, module, imported name or None, the name it is bound to) for every import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None, alias.asname or alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.lineno, node.module, alias.name, alias.asname or alias.name


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# the tests' and benches' own modules (conftest, helpers, drills, ...) are project modules too
LOCAL_MODULES = {p.stem for folder in ("tests", "bench") for p in (PROJECT / folder).glob("*.py")}
LOCAL_MODULES |= {p.parent.name for p in (PROJECT / "tests").glob("*/__init__.py")}


def _is_project_module(module: str) -> bool:
    top = module.split(".")[0]
    return top in PACKAGES or top in LOCAL_MODULES


def violations(rel: str, source: str) -> list[str]:
    """Every rule that the file at ``rel`` (relative to the project) with ``source`` breaks."""
    tree = ast.parse(source, filename=rel)
    top_dir = rel.split("/")[0]
    found = []
    project_names: set[str] = set()  # names bound to project modules (or things in them)
    for line, module, name, bound in _imports(tree):
        top = module.split(".")[0]
        where = f"{rel}:{line}"
        allowed = ("torch", "unclip", "__future__")
        if top_dir == "unclip" and top not in allowed and top not in sys.stdlib_module_names:
            found.append(f"{where}: unclip/ imports {module} (only torch and the stdlib)")
        if top == "ray" and top_dir not in RAY_ALLOWED:
            found.append(f"{where}: imports ray outside {', '.join(RAY_ALLOWED)}")
        if top_dir == "pipeline" and top == "jobs":
            found.append(f"{where}: pipeline/ imports jobs/ ({module})")
        if _is_project_module(module):
            if name is not None and _private(name):
                found.append(f"{where}: imports the private name {name} from {module}")
            project_names.add(bound)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in project_names
        ):
            found.append(f"{rel}:{node.lineno}: uses the private {node.value.id}.{node.attr}")
    return found


def test_the_tree_keeps_the_layer_rules() -> None:
    found = []
    for path in _sources():
        rel = path.relative_to(PROJECT).as_posix()
        found += violations(rel, path.read_text())
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("rel", "source", "message"),
    [
        ("unclip/x.py", "import numpy as np\n", "unclip/ imports numpy"),
        ("unclip/x.py", "from pipeline.storage import Storage\n", "unclip/ imports pipeline"),
        ("unclip/x.py", "import ray\n", "imports ray outside"),
        ("infra/x.py", "from ray import train\n", "imports ray outside"),
        ("pipeline/x.py", "from jobs.commands import COMMANDS\n", "pipeline/ imports jobs/"),
        ("jobs/x.py", "from pipeline.embed.job import _helper\n", "private name _helper"),
        ("tests/x.py", "from pipeline import storage\nstorage._local_path('a')\n", "private"),
    ],
)
def test_each_rule_catches_a_breach(rel: str, source: str, message: str) -> None:
    assert any(message in v for v in violations(rel, source)), violations(rel, source)


def test_allowed_imports_pass() -> None:
    ok = "import math\nimport torch\nfrom unclip.ema import EMA\nfrom torch import nn\n"
    assert violations("unclip/x.py", ok) == []
    assert violations("pipeline/x.py", "import ray\nfrom pipeline import storage\n") == []
    assert violations("tests/x.py", "import os\nos._exit\n") == []  # not a project module
