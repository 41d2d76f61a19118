"""The layout the project agreed on: Ray only at the edges, `import ptxray` without side effects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ptxray

PKG = Path(ptxray.__file__).parent
PLAIN = sorted(
    p.relative_to(PKG.parent).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    for p in PKG.rglob("*.py")
    if not p.name.startswith("ray_") and p.name not in ("cli.py", "demo.py")
)


def test_plain_modules_import_with_ray_unimportable():
    assert "ptxray.dicom" in PLAIN and "ptxray.cache" in PLAIN
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib\n"
        f"for m in {PLAIN!r}:\n"
        "    importlib.import_module(m)\n"
        "assert not any(k == 'ray' or k.startswith('ray.') for k in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_ptxray_has_no_side_effects(tmp_path):
    code = "import logging, ptxray, ptxray.config; assert not logging.getLogger().handlers; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []


MAX_FUNCTION_LINES = 100


def test_no_function_is_over_100_lines():
    """Long functions were split into named parts (issue 15); this keeps them that way. Counted
    from the `def` line (decorators excluded) to the function's last line, docstring included."""
    import ast

    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert len(list(PKG.rglob("*.py"))) > 30  # the walk saw the package, subpackages included
    assert long == [], "split these into named parts: " + "; ".join(long)
