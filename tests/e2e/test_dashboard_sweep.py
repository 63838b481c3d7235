"""A sweep in the browser (Debian's Chromium through Playwright, the fixtures and helpers of
tests/e2e/test_dashboard.py), against a live `robustify serve` on the embedded default: the new-job
form submits a sweep over two radii of tiny fine-tunes (one epoch, the "quick" before/after on 100
test images); its page draws the frontier as the fine-tunes end (one point per fine-tune at the
API's numbers, Pareto-optimal and recommended ones marked, the rule and the choice in words), lists
the fine-tunes with links and promotes the recommended one to a model in one click; a fine-tune's
page links back to its sweep; that model is evaluated with two common corruptions; and a compare
link with the sweep, a fine-tune and the model, opened afresh, restores the picks, the curves, the
frontier and the corruption profile (its numbers: the report's; left out while the evaluation
measures no corruptions).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import free_port, upload_model, wait_model_ready, wait_status
from tests.e2e.test_dashboard import Page, browser, serve, shots  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

DELTAS = [0.05, 0.2]
# typed into the form: one epoch and a small test sample per fine-tune
RECIPE = {"epochs": "1", "batch_size": "128", "beta": "3", "attack_steps": "3", "validation_examples": "200",
          "test_examples": "100"}
RECIPE_MORE = {"eval_wpgd_steps": "5", "eval_pgd_steps": "3", "test_wpgd_steps": "5", "test_pgd_steps": "3",
               "budget_subset": "256"}
# the promoted model's evaluation, with two corruption types at one severity on 50 images
EVALUATION = {"deltas": [0.05], "n_examples": 100, "wpgd_steps": 5, "pgd_steps": 3, "evaluation": "quick",
              "corruptions": {"types": ["gaussian_noise", "contrast"], "severities": [2], "n_examples": 50}}


def _frontier(page: Any, chart: str) -> dict[str, dict[str, Any]]:
    """The points drawn on a frontier chart, by job id: x, y, Pareto, recommended."""
    rows = page.eval_on_selector_all(f'[data-chart="{chart}"] g.point', """gs => gs.map(g => [g.dataset.job,
        +g.dataset.x, +g.dataset.y, g.dataset.pareto, g.dataset.recommended])""")
    return {r[0]: {"x": r[1], "y": r[2], "pareto": r[3], "recommended": r[4] == "true"} for r in rows}


def test_a_sweep_draws_its_frontier_and_promotes_a_fine_tune(browser: Any, shots: Path, digits_model_file: Path,
                                                              tmp_path: Path) -> None:
    port = free_port()
    with serve(tmp_path / "data", port, tmp_path / "serve.log", ROBUSTIFY_ALLOW_DOWNLOAD="false"):
        url = f"http://127.0.0.1:{port}"
        api = httpx.Client(base_url=url, timeout=30)
        model_id = wait_model_ready(api, upload_model(api, digits_model_file)["id"])["id"]
        ui = Page(browser, url, shots, viewport={"width": 1280, "height": 900})
        page = ui.page

        # the new-job form submits a sweep: the radii and the rule have fields of their own
        ui.go(f"#/new?type=sweep&model={model_id}")
        page.wait_for_selector("#sweep-fields")
        assert page.locator('[name="threat_model.delta"]').count() == 0   # the sweep's radii replace it
        page.select_option('[name="threat_model.kind"]', "w2-linf")
        page.fill('[name="sweep.delta"]', ", ".join(map(str, DELTAS)))
        page.select_option('[name="recommend.maximize"]', "w2")
        page.fill('[name="recommend.max_clean_drop"]', "0.5")
        ui.fill_form("#new-job", RECIPE, "config.")
        page.click("#new-job details > summary")
        ui.fill_form("#new-job", RECIPE_MORE, "config.")
        page.select_option('[name="config.evaluation"]', "quick")
        ui.shot("s1-new-sweep")
        page.click("#new-job button[type=submit]")
        page.wait_for_url("**/ui/#/jobs/job_*")
        sweep_id = page.url.rsplit("/", 1)[1]
        sweep = api.get(f"/v1/jobs/{sweep_id}").json()
        assert sweep["type"] == "sweep" and sweep["config"]["sweep"] == {"delta": DELTAS}, sweep
        assert sweep["config"]["recommend"] == {"maximize": "w2", "max_clean_drop": 0.5}
        assert sweep["threat_model"]["kind"] == "w2-linf"

        # the page lists the fine-tunes at once, draws each point as it ends, and the frontier when all have
        page.wait_for_selector("#sweep-children tr[data-job]")
        kids = sorted(api.get("/v1/jobs", params={"parent_job_id": sweep_id}).json()["data"],
                      key=lambda j: j["threat_model"]["delta"])
        listed = page.eval_on_selector_all("#sweep-children tr[data-job]", "rs => rs.map(r => r.dataset.job)")
        assert listed == [k["id"] for k in kids] and len(kids) == len(DELTAS)
        drawn: list[int] = []
        while ui.job_status() not in ("succeeded", "failed", "cancelled"):
            drawn.append(page.locator('[data-chart="frontier"] g.point').count())
            page.wait_for_timeout(200)
        assert drawn == sorted(drawn) and 1 in drawn, drawn   # the first fine-tune's point before the second ended
        page.wait_for_selector("#recommendation")
        done = api.get(f"/v1/jobs/{sweep_id}").json()
        assert done["status"] == "succeeded", done
        result = done["result"]
        drawn_points = _frontier(page, "frontier")
        assert set(drawn_points) == {p["job_id"] for p in result["points"]}   # one per fine-tune
        for p in result["points"]:
            mine = drawn_points[p["job_id"]]
            assert (mine["x"], mine["y"]) == pytest.approx((p["clean_accuracy"], p["w2_robust_accuracy"]))
            assert mine["pareto"] == ("true" if p["pareto"] else "false") and mine["recommended"] == p["recommended"]
        rec = result["recommendation"]
        chosen_row = f'#sweep-children tr[data-job="{rec["job_id"]}"]'
        assert rec["job_id"], rec   # a drop of 0.5 allows any fine-tune that learned anything
        assert page.locator(f'[data-chart="frontier"] circle.recommended[data-job="{rec["job_id"]}"]').count() == 1
        assert page.inner_text("#recommendation") == rec["reason"]
        assert page.get_attribute("#recommendation", "data-job") == rec["job_id"]
        assert rec["rule_text"] in page.inner_text("#rule")
        # the children's table: a link to each fine-tune, the recommended one tagged
        assert page.get_attribute(f"{chosen_row} th a", "href") == f"#/jobs/{rec['job_id']}"
        assert page.locator(f"{chosen_row} .tag").inner_text() == "recommended"
        ui.shot("s2-sweep-frontier")

        # one click promotes the recommended fine-tune's best checkpoint to a model
        page.click("#promote-recommended")
        page.wait_for_selector("#promoted-model[data-model]")
        promoted = page.get_attribute("#promoted-model", "data-model")
        chosen = api.get(f"/v1/jobs/{rec['job_id']}").json()
        assert promoted == chosen["result"]["model_id"], (promoted, chosen["result"])
        assert api.get(f"/v1/models/{promoted}").json()["status"] == "ready"
        ui.shot("s3-promoted")

        # a fine-tune's page names its sweep
        page.click(f"{chosen_row} th a")
        page.wait_for_selector("#parent-sweep")
        assert page.get_attribute("#parent-sweep", "href") == f"#/jobs/{sweep_id}"

        # the promoted model evaluated, with common corruptions
        evaluation = api.post("/v1/jobs", json={
            "type": "evaluate", "model_id": promoted, "dataset": "digits",
            "threat_model": {"kind": "w2-linf", "delta": 0.05}, "config": EVALUATION})
        assert evaluation.status_code == 202, evaluation.text
        measured = wait_status(api, evaluation.json()["id"], {"succeeded", "failed", "cancelled"}, 240)
        assert measured["status"] == "succeeded", measured
        report = api.get(f"/v1/jobs/{measured['id']}/report").json()
        # its job page: the common-corruptions card, a bar per type at the report's number
        ui.go(f"#/jobs/{measured['id']}")
        page.wait_for_selector("#corruptions tr[data-corruption] .corruption-bar")
        bars = page.eval_on_selector_all("#corruptions tr[data-corruption]", """rs => rs.map(r =>
            [r.dataset.corruption, +r.querySelector('.corruption-bar').dataset.value])""")
        per_type = report["corruptions"]["per_type"]
        assert [b[0] for b in bars] == [t["type"] for t in per_type] == ["gaussian_noise", "contrast"]
        assert [b[1] for b in bars] == pytest.approx([t["accuracy"] for t in per_type])

        # a compare link with the sweep, a fine-tune and the model, opened in a new tab, restores all of it
        other = Page(browser, url, shots, viewport={"width": 1280, "height": 900})
        other.go(f"#/compare?ids={sweep_id},{rec['job_id']},{promoted}")
        other.page.wait_for_selector('[data-chart="compare-frontier"]')
        checked = other.page.eval_on_selector_all(".picker input:checked", "bs => bs.map(b => b.value)")
        assert sorted(checked) == sorted([sweep_id, rec["job_id"], promoted])
        # along δ: the fine-tune's input and returned model, and the model's evaluation (W2 and l∞ each)
        assert other.page.locator('[data-chart="compare"] g.series').count() == 6
        # on the frontier: those three and the sweep's fine-tunes
        overlay = _frontier(other.page, "compare-frontier")
        fine_tune = {f"{rec['job_id']}:before", f"{rec['job_id']}:after", promoted}
        assert set(overlay) == fine_tune | {p["job_id"] for p in result["points"]}
        after = chosen["result"]["after"]
        assert overlay[f"{rec['job_id']}:after"]["x"] == pytest.approx(after["clean_accuracy"])
        assert overlay[promoted]["y"] == pytest.approx(report["summary"]["w2_robust_accuracy"])
        assert overlay[rec["job_id"]]["recommended"]
        # the corruption profile: the model's accuracy per type and the mean, as its report has them (once the
        # evaluation measures corruptions; until then the card is left out)
        if isinstance(report.get("corruptions"), dict):
            profile = other.page.eval_on_selector_all(
                f'#compare-corruptions td[data-entry="{promoted}"]',
                "cs => cs.map(c => [c.closest('tr').dataset.corruption, +c.dataset.value])")
            block = report["corruptions"]
            rows = [(t["type"], t["accuracy"]) for t in block["per_type"]] + [("mean", block["mean_accuracy"])]
            assert [r[0] for r in profile] == [r[0] for r in rows] == ["gaussian_noise", "contrast", "mean"]
            assert [r[1] for r in profile] == pytest.approx([r[1] for r in rows])
        else:
            assert other.page.locator("#compare-corruptions").count() == 0
        assert other.page.locator("#compare-datasets").count() == 0   # one data set
        other.shot("s4-compare-sweep")
        other.close()

        script_errors = [e for e in ui.errors if e.startswith("page error")]
        assert not script_errors, script_errors
        ui.close()
        api.close()
