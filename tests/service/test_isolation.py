"""The API process must not import torch (it stays small and starts fast)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_never_imports_torch(tmp_path):
    code = (
        "import sys\n"
        "import api.app, cli.client, migrations\n"
        "from core.settings import Settings\n"
        f"app = api.app.create_app(Settings(data_dir={str(tmp_path)!r}))\n"
        "app.openapi()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
