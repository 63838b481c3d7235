"""The demo's time in the docs names the machine it was measured on and agrees with the
measurement in docs/runtimes.md (a time without its hardware tells a reader nothing)."""
from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _minutes(text: str) -> str:
    found = re.findall(r"about (\d+) minutes", text)
    assert len(found) == 1, found
    return found[0]


def test_getting_started_states_the_demos_machine_and_measured_time() -> None:
    row = next(line for line in (DOCS / "runtimes.md").read_text().splitlines() if line.startswith("| `make demo`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    hardware, measured = cells[1], _minutes(cells[2])
    cores = re.search(r"(\d+) CPU cores", hardware)
    assert cores, hardware

    page = (DOCS / "getting-started.md").read_text()
    demo = page.split("## See it work: `make demo`", 1)[1].split("\n## ", 1)[0]
    paragraph = " ".join(demo.split())
    assert "two minutes" not in paragraph and "a laptop" not in paragraph
    assert _minutes(paragraph) == measured
    assert f"{cores.group(1)} CPU cores" in paragraph and "no GPU" in paragraph and "runtimes.md" in paragraph
    assert f"about {measured} minutes on {cores.group(1)} CPU cores" in (DOCS / "index.md").read_text()
