"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, against a
live `robustify serve` on the embedded default (its own data folder and port). The page's
Content-Security-Policy forbids eval, so the tests wait on selectors, never on script strings.

One user's path through the page (register a model through the form, fine-tune it and watch the
curve grow, download the checkpoint, register that, evaluate both, compare them with a
single-radius evaluation on an uploaded data set, read the jobs list on a desktop), then the
key prompt of a server with auth on and the message when the API goes away.
Screenshots of each step go to a temporary folder (printed with -s).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import EmbeddedServe, free_port, wait_model_ready, wait_status

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync"]
# A tiny W-TRADES recipe (about a second per epoch here), typed into the form.
TINY = {"epochs": "6", "batch_size": "128", "beta": "3", "attack_steps": "3", "validation_examples": "200",
        "test_examples": "200"}
TINY_MORE = {"eval_wpgd_steps": "5", "eval_pgd_steps": "3", "test_wpgd_steps": "5", "test_pgd_steps": "3",
             "budget_subset": "256"}
EVAL = {"deltas": "0.05, 0.1, 0.2", "n_examples": "200", "wpgd_steps": "5", "pgd_steps": "3"}
# Words a form hint must not show: the server's class names, pointers into the source, renamed fields.
PRODUCT_NAMES = {"RobustBench", "AutoAttack", "DistributedDataParallel"}
INTERNAL = r"\b(?:core|api|worker|cli)\.[a-z_]+|\b[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]+)+\b|\bold name\b|\bformer name\b"


# ------------------------------------------------------------------------------ a live server
@contextmanager
def serve(data_dir: Path, port: int, log: Path, *args: str, **env: str) -> Iterator[subprocess.Popen]:
    """`robustify serve` (API and, unless --no-worker, one worker) on `port` until the block ends."""
    env = {"ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3", "ROBUSTIFY_SSE_POLL_SECONDS": "0.2", **env}
    with EmbeddedServe(data_dir.parent, env, 90, args=args, port=port, data_dir=data_dir, log_path=log) as server:
        yield server.proc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).is_file(), "the browser tests need Debian's Chromium: apt-get install -y chromium"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ROBUSTIFY_UI_SCREENSHOTS keeps them somewhere of your choosing (never commit them)
    chosen = os.environ.get("ROBUSTIFY_UI_SCREENSHOTS")
    where = Path(chosen) if chosen else tmp_path_factory.mktemp("dashboard-screenshots")
    where.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {where}")
    return where


class Page:
    """A Playwright page that records script errors, plus the few steps the tests repeat."""

    def __init__(self, browser: Any, url: str, shots: Path, **context: Any) -> None:
        self.ctx = browser.new_context(accept_downloads=True, **context)
        self.page = self.ctx.new_page()
        self.url, self.shots = url, shots
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)

    def go(self, hash_: str) -> None:
        self.page.goto(f"{self.url}/ui/{hash_}")

    def shot(self, name: str) -> None:
        self.page.evaluate("window.scrollTo(0, 0)")   # else the sticky header lands mid-picture
        self.page.screenshot(path=self.shots / f"{name}.png", full_page=True)

    def fill_form(self, form: str, values: dict[str, str], prefix: str = "") -> None:
        for name, value in values.items():
            self.page.fill(f'{form} [name="{prefix}{name}"]', value)

    def upload_model(self, path: Path, name: str) -> None:
        self.go("#/models")
        form = "#model-upload"
        self.page.set_input_files(f'{form} [name="file"]', str(path))
        self.fill_form(form, {"architecture": "small-cnn", "num_classes": "10", "dataset": "digits",
                              "input_size": "1,8,8", "name": name})
        self.page.click(f"{form} button[type=submit]")
        self.page.wait_for_selector(f"{form} .note.info", timeout=30_000)
        # the worker checks the weights; the list turns the model ready by itself
        self.page.wait_for_selector(f'#models-table tr[data-name="{name}"] [data-status="ready"]', timeout=90_000)

    def model_id(self, name: str) -> str:
        return self.page.get_attribute(f'#models-table tr[data-name="{name}"]', "data-model")

    def job_status(self) -> str | None:
        return self.page.evaluate("document.querySelector('.job-head .badge')?.dataset.status ?? null")

    def wait_job(self, status: str, timeout: float = 120) -> None:
        self.page.wait_for_selector(f'.job-head [data-status="{status}"]', timeout=timeout * 1000)

    def close(self) -> None:
        self.ctx.close()


def _points(page: Any, chart: str, series: str) -> int | None:
    selector = f'[data-chart="{chart}"] g.series[data-name^="{series}"]'
    n = page.evaluate(f"""document.querySelector('{selector}')?.dataset.n ?? null""")
    return None if n is None else int(n)


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _interval(ci: list[float]) -> str:
    return f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f} %"


def _pp(v: float) -> str:
    """A change in percentage points as the page writes it (dom.js points)."""
    return f"{'+' if v > 0 else '−' if v < 0 else '±'}{abs(100 * v):.1f} pp"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _internal_hints(ui: Page) -> dict[str, list[str]]:
    """Form hints (every form of the dashboard) that name internals instead of saying what a field does."""
    found: dict[str, list[str]] = {}
    for where in ("#/models", "#/datasets", "#/new?type=finetune", "#/new?type=evaluate"):
        ui.go(where)
        ui.page.wait_for_selector(".field small")
        hints = ui.page.eval_on_selector_all(".field small", "els => els.map(e => e.innerText)")
        assert len(hints) >= 5, (where, hints)
        bad = [h for h in hints if any(m not in PRODUCT_NAMES for m in re.findall(INTERNAL, h))]
        if bad:
            found[where] = bad
    return found


def _scrolls_sideways(page: Any) -> list[str]:
    """The page or a table box wider than its view (scrollWidth > clientWidth)."""
    return page.evaluate("""[document.documentElement, ...document.querySelectorAll('.table-wrap')]
        .filter(el => el.scrollWidth > el.clientWidth)
        .map(el => `${el.className || el.tagName}: ${el.scrollWidth} > ${el.clientWidth}`)""")


# ------------------------------------------------------------------------------ the tests
def test_a_user_fine_tunes_evaluates_and_compares_in_the_browser(browser: Any, shots: Path, digits_model_file: Path,
                                                               tmp_path: Path) -> None:
    port = free_port()
    # no downloads: the Hub model registered below is refused by the worker at once
    with serve(tmp_path / "data", port, tmp_path / "serve.log", ROBUSTIFY_ALLOW_DOWNLOAD="false"):
        url = f"http://127.0.0.1:{port}"
        api = httpx.Client(base_url=url, timeout=30)   # the test's own view of the truth (auth is off on localhost)
        ui = Page(browser, url, shots, viewport={"width": 1280, "height": 900})
        page = ui.page

        # / leads to the dashboard; the first load is small and comes from this server only
        requests: list[Any] = []
        record = lambda r: requests.append(r)  # noqa: E731 (Playwright cannot wrap a builtin method)
        page.on("requestfinished", record)
        page.goto(url + "/")
        assert page.url == f"{url}/ui/"
        page.wait_for_selector("#jobs-table td.empty")
        page.wait_for_load_state("networkidle")
        page.remove_listener("requestfinished", record)
        assert requests and all(r.url.startswith(url + "/") for r in requests), [r.url for r in requests]
        shell = sum(r.sizes()["responseBodySize"] for r in requests if "/ui/" in r.url)
        print(f"first load: {len(requests)} requests, {shell} bytes of dashboard files, "
              f"{sum(r.sizes()['responseBodySize'] for r in requests)} bytes in all")
        assert shell < 120_000

        # the forms' hints say what a field does, in words: no class names, source paths or renamed fields
        assert _internal_hints(ui) == {}

        # register the model through the form (the worker validates it)
        ui.upload_model(digits_model_file, "digits-cnn")
        model_id = ui.model_id("digits-cnn")
        ui.shot("1-models")

        # start a fine-tune from its row; the form's fields and defaults come from the OpenAPI schema
        page.click(f'#models-table tr[data-model="{model_id}"] a:text("Fine-tune")')
        page.wait_for_selector("#new-job")
        assert page.input_value('[name="config.epochs"]') == str(
            api.get("/openapi.json").json()["components"]["schemas"]["FinetuneConfig"]["properties"]["epochs"]["default"])
        assert page.input_value("#f-model") == model_id
        page.select_option('[name="threat_model.kind"]', "w2-linf")
        page.fill('[name="threat_model.delta"]', "0.1")
        ui.fill_form("#new-job", TINY, "config.")
        page.click("#new-job details > summary")
        ui.fill_form("#new-job", TINY_MORE, "config.")
        page.select_option('[name="config.evaluation"]', "quick")   # the cheaper before/after ensemble
        ui.shot("2-new-job")
        page.click("#new-job button[type=submit]")
        page.wait_for_url("**/ui/#/jobs/job_*")
        job_id = page.url.rsplit("/", 1)[1]

        # the curve gains points while the job runs, without a reload
        seen: list[tuple[str | None, int | None]] = []
        deadline = time.monotonic() + 150
        shot_running = False
        while time.monotonic() < deadline:
            status, n = ui.job_status(), _points(page, "epochs", "W2 robust")
            seen.append((status, n))
            if status == "running" and n and not shot_running:
                ui.shot("3-job-running")
                shot_running = True
            if status in ("succeeded", "failed", "cancelled"):
                break
            page.wait_for_timeout(60)
        job = api.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        page.wait_for_selector("#before-after")
        counts = [n for _, n in seen if n is not None]
        assert counts == sorted(counts), "the curve lost points"
        assert any(s == "running" and n is not None and 1 <= n < 6 for s, n in seen), f"no partial curve seen: {seen}"
        # epochs 0 (the input model) to 6, and the selected checkpoint marked
        page.wait_for_selector('[data-chart="epochs"] g.series[data-name^="W2"][data-n="7"]')
        assert _points(page, "epochs", "Clean") == 7
        result = job["result"]
        assert page.get_attribute('[data-chart="epochs"] g.marker', "data-x") == str(result["best_epoch"])
        # the before/after table: the API's numbers, with δ and the threat model named
        # each number with its 95 % interval beneath it, the change with its paired one
        for key, label in (("clean_accuracy", "Clean"), ("w2_robust_accuracy", "W2 robust at δ = 0.1")):
            texts = page.locator(f'#before-after tr[data-metric="{key}"] > *').all_inner_texts()
            cells = [c.split("\n") for c in texts]
            assert [c[0] for c in cells[:3]] == [label, _pct(result["before"][key]), _pct(result["after"][key])], cells
            assert cells[1][1] == _interval(result["before"][f"{key}_ci95"])
            assert cells[2][1] == _interval(result["after"][f"{key}_ci95"])
            lo, hi = result["change_ci95"][key]
            assert cells[3][1] == f"{_pp(lo)} to {_pp(hi)}", cells[3]
        caption = page.inner_text("#before-after-threat")
        assert "W2 ball, l∞ ground cost, δ = 0.1" in caption and "“quick” evaluation preset" in caption
        # the verdict in the recipe's own words, the masking audit line by line, the classes one by one
        assert result["verdict"] and page.get_attribute("#verdict", "data-verdict") == result["verdict"]
        assert page.inner_text("#verdict") == result["verdict_text"]
        assert page.eval_on_selector_all("#audit li", "els => els.map(e => [e.dataset.check, e.dataset.status])") \
            == [[c["check"], c["status"]] for c in result["audit"]] and result["audit"]
        per_class = result["after"]["per_class"]
        assert page.locator("#per-class tr[data-class]").count() == len(per_class) == 10
        page.click("text=Accuracy of each of the 10 classes")
        row = page.locator('#per-class tr[data-class="3"] > *').all_inner_texts()
        class3 = per_class[3]
        assert row[2].split("\n") == [_pct(class3["clean_accuracy"]), _interval(class3["clean_accuracy_ci95"])]
        assert page.locator("#event-log li[data-type=metrics]").count() == 7   # epoch 0 (the input) to 6
        ui.shot("4-job-succeeded")

        # download the selected checkpoint: the same bytes as the API's best checkpoint
        with page.expect_download() as download:
            page.click("#download-selected")
        robust = tmp_path / "robust.safetensors"
        download.value.save_as(robust)
        best = next(c for c in api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"] if c["is_best"])
        assert _sha256(robust) == best["sha256"]

        # register the download as a second model, evaluate both along δ, compare them
        ui.upload_model(robust, "digits-cnn-robust")
        robust_id = ui.model_id("digits-cnn-robust")
        eval_jobs = []
        for mid in (model_id, robust_id):
            ui.go(f"#/new?type=evaluate&model={mid}")
            page.wait_for_selector("#new-job")
            page.fill('[name="threat_model.delta"]', "0.1")
            ui.fill_form("#new-job", EVAL, "config.")
            page.click("#new-job details > summary")
            page.select_option('[name="config.evaluation"]', "quick")
            page.click("#new-job button[type=submit]")
            page.wait_for_url("**/ui/#/jobs/job_*")
            ui.wait_job("succeeded")
            eval_jobs.append(page.url.rsplit("/", 1)[1])
            page.wait_for_selector('[data-chart="robustness"] g.ref[data-name="clean"]')
            assert _points(page, "robustness", "W2") == 4   # the three radii, from the clean accuracy at δ = 0
            # the preset, the audit and every attack of the ensemble, as the report has them
            report = api.get(f"/v1/jobs/{eval_jobs[-1]}/report").json()
            assert page.get_attribute("#evaluation-preset", "data-preset") == "quick"
            assert page.eval_on_selector_all("#audit li", "els => els.map(e => e.dataset.status)") \
                == [c["status"] for c in report["audit"]] and report["audit"]
            assert page.locator("#attacks tr[data-attack]").count() == sum(len(r["attacks"]) for r in report["w2"])
            w2 = report["w2"][0]
            cell = page.locator("#robustness-table tbody tr").first.locator("td").first.inner_text().split("\n")
            assert cell == [_pct(w2["robust_accuracy"]), _interval(w2["ci95"])], cell
        ui.shot("5-evaluation")

        # the robust weights again, named as Hub models are (no space, no hyphen: the widest cell of the jobs
        # list unless it may wrap)
        with open(robust, "rb") as fh:
            long_name = api.post("/v1/models", files={"file": ("r.safetensors", fh)}, data={
                "architecture": "small-cnn", "num_classes": "10", "dataset": "digits",
                "name": "timm/vit_base_patch16_clip_224.openai_ft_in12k_in1k_digits"})
        assert long_name.status_code == 201, long_name.text
        wait_model_ready(api, long_name.json()["id"])

        # a single-radius evaluation on an uploaded data set (the real digits, by name)
        from sklearn.datasets import load_digits

        digits = load_digits()
        buf = io.BytesIO()
        np.savez(buf, x=np.round(digits.images * (255 / 16)).astype(np.uint8), y=digits.target)
        mine = api.post("/v1/datasets", files={"file": ("d.npz", buf.getvalue())}, data={"name": "my-digits"})
        assert mine.status_code == 201, mine.text
        single = api.post("/v1/jobs", json={
            "type": "evaluate", "model_id": long_name.json()["id"], "dataset": mine.json()["id"],
            "threat_model": {"kind": "w2-linf", "delta": 0.1},
            "config": {"deltas": [0.1], "n_examples": 100, "wpgd_steps": 5, "pgd_steps": 3, "evaluation": "quick"}})
        assert single.status_code == 202, single.text
        single_id = single.json()["id"]
        wait_status(api, single_id, {"succeeded"}, timeout=120)

        ui.go("#/compare")
        for mid in (model_id, robust_id):
            page.check(f'.picker input[value="{mid}"]')
        page.wait_for_selector(f'#compare-table tr[data-entry="{robust_id}"][data-attack="W2 (W-PGD)"]')
        assert page.locator('[data-chart="compare"] g.series').count() == 4   # two models × (W2, l∞ PGD)
        assert page.locator('[data-chart="compare"] g.ref').count() == 2      # their clean accuracies
        for mid, ev in zip((model_id, robust_id), eval_jobs, strict=True):
            report = api.get(f"/v1/jobs/{ev}/report").json()
            row = f'#compare-table tr[data-entry="{mid}"][data-attack="W2 (W-PGD)"]'
            for w2 in report["w2"]:
                assert page.inner_text(f'{row} td[data-delta="{w2["delta"]}"]') == _pct(w2["robust_accuracy"])
            assert page.inner_text(f"{row} td[data-clean]") == _pct(report["clean_accuracy"])
        assert f"ids={model_id},{robust_id}" in page.url   # the comparison can be shared as a link
        # one radius: a line from the clean accuracy at δ = 0 to the robust point, not a lone dot at the edge
        page.check(f'.picker input[value="{single_id}"]')
        page.wait_for_selector(f'#compare-table tr[data-entry="{single_id}"]')
        report = api.get(f"/v1/jobs/{single_id}/report").json()
        for attack, row in (("W2 (W-PGD)", report["w2"][0]), ("l∞ PGD", report["pointwise"][0])):
            line = f'[data-chart="compare"] g.series[data-name*="{single_id[:12]}"][data-name$="{attack}"]'
            assert page.eval_on_selector_all(f"{line} circle", "cs => cs.map(c => [+c.dataset.x, +c.dataset.y])") == [
                [0, report["clean_accuracy"]], [0.1, row["robust_accuracy"]]], attack
            assert page.locator(f"{line} path").count() == 1, attack
        assert page.locator('[data-chart="compare"] g.series').count() == 6
        ui.shot("6-compare")

        # the jobs list: filters and paging (two per page here)
        ui.go("#/jobs?type=evaluate")
        page.wait_for_selector("#jobs-table tr[data-job]")
        listed = page.eval_on_selector_all("#jobs-table tr[data-job]", "rows => rows.map(r => r.dataset.job)")
        assert sorted(listed) == sorted([*eval_jobs, single_id])
        ui.go("#/jobs?limit=2")
        page.wait_for_selector("#jobs-table tr[data-job]")
        first = page.eval_on_selector_all("#jobs-table tr[data-job]", "rows => rows.map(r => r.dataset.job)")
        page.click("text=Older →")
        page.wait_for_selector(".pager :text('page 2')")
        second = page.eval_on_selector_all("#jobs-table tr[data-job]", "rows => rows.map(r => r.dataset.job)")
        assert first + second == [j["id"] for j in api.get("/v1/jobs", params={"limit": 10}).json()["data"]]
        ui.shot("7-jobs")

        # a long fine-tune, cancelled from its page (its model's long name is the widest cell of the jobs list)
        ui.go(f"#/new?type=finetune&model={long_name.json()['id']}")
        page.wait_for_selector("#new-job")
        ui.fill_form("#new-job", {**TINY, "epochs": "200"}, "config.")
        page.click("#new-job button[type=submit]")
        page.wait_for_url("**/ui/#/jobs/job_*")
        ui.wait_job("running", timeout=60)
        long_id = page.url.rsplit("/", 1)[1]

        # the jobs list on a desktop, a job running: data sets by name, each fine-tune's outcome, no sideways scroll
        page.set_viewport_size({"width": 1400, "height": 900})
        ui.go("#/jobs")
        page.wait_for_selector(f'#jobs-table tr[data-job="{long_id}"] [data-status="running"]')
        # its progress label, the widest text of a row ("12 % · epoch 1/200 · …")
        page.wait_for_selector(f'#jobs-table tr[data-job="{long_id}"] .progress span:has-text("·")', timeout=60_000)
        cell = lambda job, what: f'#jobs-table tr[data-job="{job}"] td[{what}]'  # noqa: E731
        assert page.inner_text(cell(single_id, "data-dataset")) == "my-digits"
        assert page.inner_text(cell(job_id, "data-dataset")) == "digits"
        improved = api.get(f"/v1/jobs/{job_id}").json()["result"]["improved"]
        assert page.get_attribute(cell(job_id, "data-improved"), "data-improved") == str(improved).lower()
        assert page.inner_text(cell(job_id, "data-improved")) == ("improved" if improved else "not improved")
        assert page.get_attribute(cell(job_id, "data-improved"), "title") == result["verdict_text"]
        assert page.inner_text(cell(single_id, "data-improved")) == "—"   # an evaluation has no outcome
        assert page.inner_text(cell(long_id, "data-improved")) == "—"     # nor a fine-tune still running
        assert _scrolls_sideways(page) == []
        ui.shot("7a-jobs-desktop")
        page.set_viewport_size({"width": 1280, "height": 900})

        ui.go(f"#/jobs/{long_id}")
        ui.wait_job("running", timeout=60)
        page.once("dialog", lambda d: d.accept())
        page.click("#cancel-job")
        ui.wait_job("cancelled", timeout=60)
        assert api.delete(f"/v1/datasets/{mine.json()['id']}").status_code == 200

        # a data set whose stored test split lacks a class: uploaded through the form (the census warns), then deleted
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 4
        npz = tmp_path / "tiny.npz"
        np.savez(npz, x=x, y=y, x_test=x[:9], y_test=np.arange(9) % 3)
        ui.go("#/datasets")
        # the archive-only fields (from the schema) are grouped and say so; left as they are, they are not sent
        page.wait_for_selector("#archive-options [data-field]")   # the view renders after the schema loads
        archive = page.eval_on_selector_all("#archive-options [data-field]", "els => els.map(e => e.dataset.field)")
        assert archive == ["image_size", "channels", "test_fraction", "seed"], archive
        assert page.input_value('#archive-options [name="channels"]') == "3"
        page.set_input_files('#dataset-upload [name="file"]', str(npz))
        page.click("#dataset-upload button[type=submit]")
        page.wait_for_selector("#datasets-table tr[data-dataset]")
        uploaded = page.inner_text("#dataset-upload .note")
        assert "40 images, 4 classes" in uploaded and "1 census warning" in uploaded, uploaded
        page.wait_for_selector('#dataset-warnings [data-code="class_missing"]')
        assert "the test split has no image of class 3" in page.inner_text("#dataset-warnings")
        assert page.inner_text("#datasets-table td.census summary").startswith("train 10–10 · test 0–3")
        ui.shot("7b-datasets")
        page.once("dialog", lambda d: d.accept())
        page.click("#datasets-table tr[data-dataset] button.danger")
        page.wait_for_selector("#datasets-table td.empty")
        assert api.get("/v1/datasets").json()["data"] == []

        # a Hugging Face Hub model through its form: a bad input size is marked on its field, then the
        # input contract typed in reaches the API as lists
        ui.go("#/models")
        page.click('[role=tab]:text("Hugging Face Hub")')
        ui.fill_form("#model-hub", {"name": "acme/tiny-cnn", "num_classes": "10", "dataset": "digits",
                                    "input_size": "1,8"})
        page.click("#model-hub button[type=submit]")
        page.wait_for_selector('#model-hub [data-field="input_size"] .field-error')
        ui.shot("7c-hub-model")
        assert "three positive sizes" in page.inner_text('#model-hub [data-field="input_size"] .field-error')
        ui.fill_form("#model-hub", {"input_size": "1,8,8", "input_mean": "0.5", "input_std": "0.25"})
        page.click("#model-hub button[type=submit]")
        page.wait_for_selector("#model-hub .note.info")
        hub = [m for m in api.get("/v1/models").json()["data"] if m["source"] == "hf-hub"]
        assert [(m["name"], m["input_size"], m["input_mean"], m["input_std"]) for m in hub] == [
            ("acme/tiny-cnn", [1, 8, 8], [0.5], [0.25])]

        # the same job page on a phone
        phone = Page(browser, url, shots, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
        phone.go(f"#/jobs/{job_id}")
        phone.page.wait_for_selector("#before-after")
        width = phone.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width} px)"
        phone.shot("8-job-phone")
        phone.close()

        # no script error; the one failed request the browser logs is the Hub form's refused input size
        assert ui.errors == ["console: Failed to load resource: the server responded with a status of 422 "
                             "(Unprocessable Entity)"], ui.errors
        ui.close()
        api.close()


def test_key_prompt_and_unreachable_api(browser: Any, shots: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    made = subprocess.run([sys.executable, "-m", "cli", "keys", "create", "browser"], capture_output=True, text=True,
                          env={**env, "ROBUSTIFY_DATA_DIR": str(data)}, cwd=tmp_path, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.split()[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with serve(data, port, log, "--no-worker", ROBUSTIFY_AUTH="on") as server:
        # the shell needs no key, the data does
        assert httpx.get(f"{url}/ui/app.js").status_code == 200
        assert httpx.get(f"{url}/v1/jobs").status_code == 401

        ui = Page(browser, url, shots, viewport={"width": 1280, "height": 800})
        page = ui.page
        ui.go("#/jobs")
        page.wait_for_selector("#key-dialog[open]")
        ui.shot("9-key-prompt")
        page.fill("#key-input", "rk_not_a_key")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-error:has-text('refused')")
        assert page.is_visible("#key-dialog[open]")
        page.fill("#key-input", key)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#jobs-table td.empty")
        assert not page.is_visible("#key-dialog[open]")
        assert page.evaluate("sessionStorage.getItem('robustify.apiKey')") == key
        # asked once: a reload and other pages use the stored key
        page.reload()
        ui.go("#/models")
        page.wait_for_selector("#models-table td.empty")
        assert not page.is_visible("#key-dialog[open]")

        # the API goes away: the page says so, then carries on when it is back
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        page.wait_for_selector("#banner:not([hidden])", timeout=15_000)
        assert "unreachable" in page.inner_text("#banner")
        ui.shot("10-api-unreachable")
        with serve(data, port, log, "--no-worker", ROBUSTIFY_AUTH="on"):
            page.wait_for_selector("#banner", state="hidden", timeout=15_000)
            page.wait_for_selector("#models-table td.empty")
            assert not page.is_visible("#key-dialog[open]")   # the stored key still works
        # the refused key and the outage log failed requests to the console; scripts must not fail
        script_errors = [e for e in ui.errors if e.startswith("page error")]
        assert not script_errors, script_errors
        ui.close()
