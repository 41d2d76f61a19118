"""The Makefile's install plan, read with `make -n` (nothing runs): `make demo` installs the package
without the test extras, `make test` adds them after a demo install, and `make demo` after
`make test` installs nothing."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _plan(target: str, venv: Path) -> list[str]:
    # A plain, top-level make: under `make test` this runs as a sub-make, which would inherit
    # MAKEFLAGS/MAKELEVEL and print "make[1]: Entering/Leaving directory" lines into the plan.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True, env=env,
    ).stdout
    return out.splitlines()


def _installs(plan: list[str]) -> list[str]:
    return [line for line in plan if " pip install " in line]


def _touch_newer_than_pyproject(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    newer = max(time.time(), (REPO / "pyproject.toml").stat().st_mtime + 1)
    os.utime(path, (newer, newer))


def test_demo_installs_no_test_extras_and_test_adds_them(tmp_path):
    venv = tmp_path / ".venv"
    demo = _plan("demo", venv)
    assert [line.split(" pip install ")[1] for line in _installs(demo)] == ["--quiet -e ."]
    assert demo[-1] == f"{venv}/bin/ptxray demo"

    # after `make demo` installed (its stamp is newer than pyproject.toml): the extras, then pytest
    _touch_newer_than_pyproject(venv / ".installed-demo")
    test = _plan("test", venv)
    assert [line.split(" pip install ")[1] for line in _installs(test)] == ["--quiet -e '.[test]'"]
    assert test[-1] == f"{venv}/bin/python -m pytest -q"
    assert _installs(_plan("demo", venv)) == []
    # `make test` alone stamps the demo's install too (the extras include everything the demo needs)
    assert any(line.startswith("touch ") and line.endswith(f"{venv}/.installed-demo") for line in test)
