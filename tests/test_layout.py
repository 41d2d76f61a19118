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
