"""A chaos worker process: ``python -m replaysafe.chaos.worker SPEC.json`` (a matrix cell, or the
demo preset: :mod:`replaysafe.chaos.demo_worker`).

Runs the real runtime (one :class:`~replaysafe.runtime.worker.Worker`) for the chaos app of one
run, against a real broker and ledger, with the run's fault armed (``exit`` is ``os._exit``: the
process dies with nothing settled, as under SIGKILL). SIGTERM/SIGINT stop it gracefully (drain,
settle what finished). The harness that started it restarts it after a crash and stops it at the
end of the run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from replaysafe.chaos.app import RecordingBroker, RunSpec, arm, build_app, close_quietly, relayed
from replaysafe.chaos.demo_worker import demo_worker_main
from replaysafe.chaos.ledgers import ledger_from_spec
from replaysafe.chaos.publish import broker_from_conf, normalise_broker_url
from replaysafe.failpoints import Failpoints
from replaysafe.runtime.worker import Worker
from replaysafe.testing.netcut import CutRelay


def load_spec(path: str) -> RunSpec:
    return RunSpec.from_json(Path(path).read_text())


async def main(spec_path: str) -> None:
    """One worker process of a matrix cell (its :class:`RunSpec` at ``spec_path``)."""
    spec = load_spec(spec_path)
    failpoints = Failpoints()
    relay: CutRelay | None = None
    if spec.fault == "broker_restart":
        # the fault cuts this worker's connections: they all go through its own relay
        relay, url = await relayed(
            normalise_broker_url(spec.broker["kind"], spec.broker.get("url"))
        )
        spec.broker = {**spec.broker, "url": url}
    broker = broker_from_conf(spec.broker, spec, failpoints)
    ledger = ledger_from_spec(spec.ledger)
    app = build_app(spec, RecordingBroker(broker, spec.record_dir), ledger, failpoints)
    arm(spec, failpoints, ledger, relay)
    worker = Worker(app)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run(drain_timeout=5.0)
    finally:
        await close_quietly(broker, ledger, relay)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    if len(sys.argv) != 2:
        sys.exit("usage: python -m replaysafe.chaos.worker SPEC.json")
    doc = json.loads(Path(sys.argv[1]).read_text())
    # one worker process for every chaos run: a matrix cell's spec, or the demo preset's
    # (``{"run": ..., "kills": ...}``)
    asyncio.run(demo_worker_main(doc) if "kills" in doc else main(sys.argv[1]))
