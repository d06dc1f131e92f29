"""Programs the fault drills run in processes of their own (``python -m drills.<name>`` with the
tests folder and the project on ``PYTHONPATH``): a Ray cluster that loses nodes, the drivers that
run on it, a writer killed mid-write. Real modules, so ruff checks them like the rest."""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.dirname(TESTS)


def environment(**extra: str) -> dict[str, str]:
    """This process's environment with ``drills`` importable (and ``extra`` added)."""
    path = os.pathsep.join([TESTS, PROJECT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, **extra}
