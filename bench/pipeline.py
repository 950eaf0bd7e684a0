"""Pipeline cost, measured side by side in one run.

The same N messages on the memory broker, consumed by:
  raw            a plain subscribe → handler → ack loop (no replaysafe runtime)
  at-least-once  the runtime's AT_LEAST_ONCE pipeline
  eo-memory      EFFECTIVELY_ONCE on the in-memory ledger (pipeline logic only)
  eo-sqlite-*    EFFECTIVELY_ONCE on SQLite, synchronous=NORMAL and FULL (durable claims)

Reports messages/s and each variant's ratio to the raw loop; writes bench/results/pipeline.json.
Timings are for this machine only; compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from replaysafe import App, Context, Effect, Envelope, Guarantee, Worker
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.ledger.base import Ledger
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.ledger.sqlite import SQLiteLedger

SOURCE = "bench"


async def _publish(broker: MemoryBroker, n: int) -> None:
    now = time.time()
    envs = [
        Envelope.of(f"op:{i}", {"i": i, "amount": 100}).with_published_at(now) for i in range(n)
    ]
    for start in range(0, n, 500):
        await broker.publish(SOURCE, envs[start : start + 500])


async def raw_loop(n: int, concurrency: int) -> float:
    broker = MemoryBroker()
    await _publish(broker, n)
    sub = await broker.subscribe(SOURCE, "raw", prefetch=concurrency)
    done = 0
    started = time.perf_counter()
    async for d in sub:
        json.loads(d.body)  # the handler's minimum: decode the payload
        await d.ack()
        done += 1
        if done == n:
            break
    elapsed = time.perf_counter() - started
    await sub.close()
    return elapsed


async def runtime_loop(
    n: int, concurrency: int, guarantee: Guarantee, make_ledger: Callable[[], Ledger]
) -> float:
    broker = MemoryBroker()
    ledger = make_ledger()
    app = App("bench", broker=broker, ledger=ledger)
    finished = asyncio.Event()
    count = 0

    async def handle(ctx: Context) -> None:
        nonlocal count
        count += 1
        if count == n:
            finished.set()

    effect = Effect.keyed("downstream") if guarantee is Guarantee.EFFECTIVELY_ONCE else None
    app.handler(SOURCE, guarantee=guarantee, effect=effect, concurrency=concurrency)(handle)
    await _publish(broker, n)
    worker = Worker(app)
    started = time.perf_counter()
    task = asyncio.create_task(worker.run())
    await finished.wait()
    group = app.handlers["handle"].group
    while broker.depth(SOURCE, group):  # noqa: ASYNC110 - no drained event to wait on
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    worker.stop()
    await task
    await ledger.close()
    return elapsed


async def main_async(n: int, concurrency: int, rounds: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="replaysafe-bench-"))
    counter = iter(range(10_000))
    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "raw": lambda: raw_loop(n, concurrency),
        "at-least-once": lambda: runtime_loop(
            n, concurrency, Guarantee.AT_LEAST_ONCE, MemoryLedger
        ),
        "eo-memory": lambda: runtime_loop(n, concurrency, Guarantee.EFFECTIVELY_ONCE, MemoryLedger),
        "eo-sqlite-normal": lambda: runtime_loop(
            n,
            concurrency,
            Guarantee.EFFECTIVELY_ONCE,
            lambda: SQLiteLedger(tmp / f"n{next(counter)}.db", synchronous="NORMAL"),
        ),
        "eo-sqlite-full": lambda: runtime_loop(
            n,
            concurrency,
            Guarantee.EFFECTIVELY_ONCE,
            lambda: SQLiteLedger(tmp / f"f{next(counter)}.db", synchronous="FULL"),
        ),
    }
    best: dict[str, float] = {}
    # interleave the variants round by round so drift on the machine hits them all alike
    for _ in range(rounds):
        for name, run in variants.items():
            elapsed = await run()
            best[name] = min(best.get(name, float("inf")), elapsed)
    raw = best["raw"]
    return {
        "benchmark": "pipeline",
        "messages": n,
        "concurrency": concurrency,
        "rounds": rounds,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": {
            name: {
                "seconds": round(t, 4),
                "messages_per_s": round(n / t, 1),
                "ratio_to_raw": round(raw / t, 4),
            }
            for name, t in best.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "pipeline.json"
    )
    args = parser.parse_args()
    report = asyncio.run(main_async(args.messages, args.concurrency, args.rounds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report["results"].items():
        print(f"{name:18} {r['messages_per_s']:>10.1f} msg/s   x{r['ratio_to_raw']:.3f} of raw")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
