"""Load on a running API, from a separate process: constant rate (open loop) and a burst.

    python bench/bench_api_load.py --url http://127.0.0.1:8000 --key rk_... --path /v1/jobs/job_... \\
        [--url http://127.0.0.1:8001 ...]  --rate 200 --seconds 20 --burst 400

Each --url gets the same load in turn (so a baseline server measured in the same run gives a
ratio): requests are sent at exactly --rate per second whatever the answers take (a slow server
is not allowed to slow the load down), and latency percentiles, statuses and errors are
printed; then --burst concurrent requests, and how long /healthz takes right after.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import time
from typing import Any

import httpx


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def constant_rate(url: str, headers: dict[str, str], path: str, rate: float, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        async def one() -> None:
            start = time.perf_counter()
            try:
                r = await client.get(path)
                statuses[r.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                return
            latencies.append(time.perf_counter() - start)

        tasks = []
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return {"sent": len(tasks), "statuses": dict(statuses), "p50_ms": 1000 * _percentile(latencies, 0.50),
            "p99_ms": 1000 * _percentile(latencies, 0.99), "mean_ms": 1000 * statistics.fmean(latencies or [0.0])}


async def burst(url: str, headers: dict[str, str], path: str, n: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
        async def one() -> Any:
            try:
                return (await client.get(path)).status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

        start = time.perf_counter()
        statuses = collections.Counter(await asyncio.gather(*(one() for _ in range(n))))
        took = time.perf_counter() - start
    health: int | str   # the status code, or the error that kept it from coming
    try:
        t = time.perf_counter()
        health = httpx.get(f"{url}/healthz", timeout=5).status_code
        health_s = time.perf_counter() - t
    except httpx.HTTPError as exc:
        health, health_s = type(exc).__name__, float("nan")
    return {"statuses": dict(statuses), "seconds": took, "healthz": health, "healthz_s": health_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--path", default="/v1/jobs")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--burst", type=int, default=0)
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"}
    results = []
    for url in args.url:
        rate = asyncio.run(constant_rate(url, headers, args.path, args.rate, args.seconds))
        print(f"{url}: {args.rate:g} req/s for {args.seconds:g} s: {rate}", flush=True)
        results.append(rate)
        if args.burst:
            print(f"{url}: burst of {args.burst}: {asyncio.run(burst(url, headers, args.path, args.burst))}",
                  flush=True)
    if len(results) > 1:
        base = results[0]
        for url, r in zip(args.url[1:], results[1:], strict=True):
            print(f"p99 {url} / {args.url[0]}: {r['p99_ms'] / base['p99_ms']:.2f}")


if __name__ == "__main__":
    main()
