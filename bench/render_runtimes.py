"""Render benchmark results (bench_engine.py --out, gpu_check.py) into docs/runtimes.md.

    python bench/render_runtimes.py bench/results/<machine>.json [more.json ...] [--docs docs/runtimes.md]

Everything between the markers `<!-- bench:start -->` and `<!-- bench:end -->` of the page is
replaced by one section per results file: the machine, the command that measured it, and the
table (bench_engine.table). With --print the section is printed instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import table  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section(result: dict) -> str:
    head = (f"### {result['device']}, {result['threads']} thread(s) — machine `{result['machine']}`\n\n"
            f"Measured {result['created']} with torch {result['torch']}:\n\n"
            f"```\n{result['command']}\n```\n\n")
    return head + table(result["rows"]) + "\n"


def render(page: str, results: list[dict]) -> str:
    if START not in page or END not in page:
        raise ValueError(f"the page has no {START} … {END} markers")
    before, rest = page.split(START, 1)
    _, after = rest.split(END, 1)
    body = "\n".join(section(r) for r in results)
    return f"{before}{START}\n{body}{END}{after}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write benchmark results into the docs' performance page")
    ap.add_argument("results", nargs="+", help="JSON files written by bench_engine.py --out")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "runtimes.md"))
    ap.add_argument("--print", action="store_true", help="print the section instead of writing the page")
    args = ap.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.results]
    for path, r in zip(args.results, results, strict=True):
        if "rows" not in r:
            ap.error(f"{path} is not a bench_engine.py results file (no 'rows')")
    if args.print:
        print("\n".join(section(r) for r in results))
        return 0
    page = Path(args.docs)
    page.write_text(render(page.read_text(), results))
    print(f"updated {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
