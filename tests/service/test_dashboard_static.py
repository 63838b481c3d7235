"""The dashboard's static shell: where it is served, its headers, that it is self-contained (no
code or data from elsewhere), that it carries no data, and that `pip install` ships every file."""
from __future__ import annotations

import posixpath
import re
import tomllib
from pathlib import Path

from api.routes.ui import UI_DIR

ROOT = Path(__file__).resolve().parents[2]
# `import … from "./x.js"` (loaded with the page) and `import("./x.js")` (loaded when a view needs it:
# a sweep's page, the compare page's overlays) in the modules; src= and href= in the page.
_IMPORT = re.compile(r"""from\s+["'](\.{1,2}/[^"']+)["']""")
_LAZY_IMPORT = re.compile(r"""import\s*\(\s*["'](\.{1,2}/[^"']+)["']""")
_ATTR = re.compile(r"""(?:src|href)="([^"#:]+)\"""")


def _reachable_assets(lazy: bool = True) -> set[str]:
    """Every file the page loads, following the module imports from index.html (`lazy`: the
    modules a view imports when it needs them too; else only what the first load fetches)."""
    todo = [m for m in _ATTR.findall((UI_DIR / "index.html").read_text()) if not m.startswith("..")]
    seen: set[str] = set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        if rel.endswith(".js"):
            text = (UI_DIR / rel).read_text()
            todo += [posixpath.normpath(posixpath.join(posixpath.dirname(rel), imp))
                     for imp in _IMPORT.findall(text) + (_LAZY_IMPORT.findall(text) if lazy else [])]
    return seen


def test_root_and_ui_redirect_to_the_dashboard(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "ui/"
    assert client.head("/", follow_redirects=False).status_code == 307
    r = client.get("/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/ui/")


def test_the_shell_is_served_without_a_key_and_the_data_is_not(client):
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and page.headers["x-content-type-options"] == "nosniff"
    # the same request for data is refused: the shell is all an anonymous caller gets
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/models").status_code == 401
    # the dashboard is not part of the API's schema
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/ui") or p == "/"]


def test_every_asset_loads_from_the_package_and_nothing_from_elsewhere(client):
    assets = _reachable_assets()
    assert {"style.css", "app.js", "api.js", "chart.js", "views/job.js", "views/compare.js"} <= assets
    on_disk = {p.relative_to(UI_DIR).as_posix() for p in UI_DIR.rglob("*") if p.is_file()}
    assert assets | {"index.html"} == on_disk, "a file is unused, or the page loads one that is missing"
    sizes: dict[str, int] = {}
    for rel in sorted(assets):
        r = client.get(f"/ui/{rel}")
        assert r.status_code == 200, rel
        kind = r.headers["content-type"]
        assert ("javascript" in kind) if rel.endswith(".js") else kind.startswith("text/css"), (rel, kind)
        text = r.text
        # offline: no CDN, no font service, no absolute URL to fetch anything from
        assert not re.search(r"""(?:src|href|url\(|fetch\(|import)\s*[=(]?\s*["']?https?://""", text), rel
        sizes[rel] = len(r.content)
    shell = len(client.get("/ui/").content)
    # the first load (what every visit fetches) and everything, views loaded on demand included
    first = shell + sum(sizes[rel] for rel in _reachable_assets(lazy=False))
    assert first < 120_000, f"the dashboard's first load weighs {first} bytes uncompressed; keep it small"
    assert shell + sum(sizes.values()) < 180_000, "the dashboard weighs more than 180 kB uncompressed; keep it small"
    assert {"frontier.js", "views/sweep.js"} <= assets - _reachable_assets(lazy=False)   # a sweep's page only


def test_assets_revalidate_with_etags(client):
    first = client.get("/ui/app.js")
    assert first.headers["cache-control"] == "no-cache" and first.headers["etag"]
    again = client.get("/ui/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content


def test_unknown_or_escaping_paths_are_404_problems(client):
    for path in ("/ui/nope.js", "/ui/../api/app.py", "/ui/%2e%2e/api/app.py", "/ui/views/../../app.py"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("application/problem+json")


def test_pip_install_ships_every_dashboard_file():
    """The package-data globs of pyproject.toml cover each file under api/ui (what a wheel carries)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["api"]
    shipped = {p for pat in patterns for p in UI_DIR.parent.glob(pat)}   # setuptools globs the same way
    files = {p for p in UI_DIR.rglob("*") if p.is_file()}
    assert files
    missing = sorted(p.relative_to(UI_DIR).as_posix() for p in files - shipped)
    assert not missing, f"not shipped by `pip install`: {missing}"
