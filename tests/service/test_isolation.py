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
        "from core.service.settings import Settings\n"
        f"app = api.app.create_app(Settings(data_dir={str(tmp_path)!r}))\n"
        "app.openapi()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_image_folder_uploads_and_architecture_listings_stay_torch_free(tmp_path):
    """Decoding an archive (numpy + Pillow), registering a Hub model and listing architectures (a cached
    family list, read from disk) happen in the API process without torch."""
    from importlib import metadata

    from tests.archives import folder_entries, zip_bytes

    (tmp_path / "photos.zip").write_bytes(zip_bytes(folder_entries(per_class=3)))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"architectures-timm-{metadata.version('timm')}.json").write_text('[{"id": "timm:resnet18"}]')
    code = (
        "import sys\n"
        "import api.app, migrations\n"
        "from core.service.settings import Settings\n"
        "from fastapi.testclient import TestClient\n"
        f"settings = Settings(data_dir={str(tmp_path)!r}, auth='off')\n"
        "migrations.upgrade(settings.resolved_database_url)\n"
        "with TestClient(api.app.create_app(settings)) as c:\n"
        f"    with open({str(tmp_path / 'photos.zip')!r}, 'rb') as fh:\n"
        "        r = c.post('/v1/datasets', data={'image_size': '16'}, files={'file': ('photos.zip', fh)})\n"
        "    assert r.status_code == 201 and r.json()['num_classes'] == 3, r.text\n"
        "    r = c.post('/v1/models', json={'source': 'hf-hub', 'name': 'acme/x', 'num_classes': 3,\n"
        "                                   'dataset': 'imagenet'})\n"
        "    assert r.status_code == 201 and r.json()['source'] == 'hf-hub', r.text\n"
        "    r = c.get('/v1/architectures', params={'family': 'timm', 'q': 'resnet'})\n"
        "    assert [a['id'] for a in r.json()['data']] == ['timm:resnet18'], r.text\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
