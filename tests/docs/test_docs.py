"""The documentation: the site builds with warnings as errors, every page is in it, every
setting is documented, and nothing in the repository points outside it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _nav_pages() -> list[str]:
    with open(ROOT / "mkdocs.yml") as fh:
        config = yaml.load(fh, Loader=yaml.BaseLoader)  # plain YAML is enough for the nav
    return [page for entry in config["nav"] for page in entry.values()]


def test_site_builds_strictly_with_every_page(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    pages = _nav_pages()
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))  # no page left out of the nav
    for page in pages:
        html = tmp_path / "site" / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert html.is_file() and "<h1" in html.read_text(), page


def test_every_setting_is_documented():
    from core.service.settings import Settings

    operations = (ROOT / "docs" / "operations.md").read_text()
    missing = [f"ROBUSTIFY_{name.upper()}" for name in Settings.model_fields
               if f"ROBUSTIFY_{name.upper()}" not in operations]
    assert not missing, f"document these in docs/operations.md: {missing}"


def test_no_file_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".npz", ".safetensors"):
            continue
        text = path.read_text(errors="ignore")
        if any(marker in text for marker in ("../" + "shared/", "/work/" + "shared")):
            offenders.append(name)
    assert not offenders, offenders
