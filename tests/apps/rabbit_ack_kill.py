"""SIGKILL right after ``ack_confirmed()`` returns, many times: the child side of
tests/test_rabbitmq_ack_confirmed.py.

Run as ``python -m tests.apps.rabbit_ack_kill URL SOURCE GROUP ROUNDS LOG PARALLEL``. The process
imports the adapter once, then forks one child per round, at most ``PARALLEL`` alive at a time
(a fork costs milliseconds, a fresh interpreter with aio-pika about half a second).

Each child starts a :class:`~replaysafe.testing.netcut.CutRelay` of its own toward ``URL`` and
opens its ``RabbitMQBroker`` through it, as the demo's and the chaos harness's worker processes
do: the relay dies with the child, so bytes the child wrote and the relay had not forwarded yet
are lost, as are bytes still in any socket buffer or queued in the broker's channel process when
a connection dies. The child takes ONE delivery from ``GROUP``'s queue, appends ``got <op>`` to
``LOG``, awaits ``ack_confirmed()``, appends ``acked <op>`` (or ``unconfirmed <op>`` when it
raised) and SIGKILLs itself at once: no close, no flush, no loop iteration in between. Lines are
written with unbuffered ``os.write`` (a line written survives the kill).

Bounded: ``ROUNDS`` children; a child that gets no delivery within ``RECEIVE`` seconds writes
``idle`` and exits 3, one that runs longer than ``ROUND`` seconds is killed (``stuck``). The
parent stops at the first child that did not die of its own SIGKILL and exits non-zero.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from replaysafe.brokers.rabbitmq import RabbitMQBroker
from replaysafe.envelope import HEADER_OPERATION_ID
from replaysafe.errors import BrokerError
from replaysafe.failpoints import Failpoints
from replaysafe.testing.netcut import CutRelay

RECEIVE = 10.0  # seconds a child waits for its delivery
ROUND = 30.0  # seconds a child may take in all before the parent kills it


def _line(fd: int, text: str) -> None:
    os.write(fd, (text + "\n").encode())


async def _child(url: str, source: str, group: str, fd: int) -> None:
    relay = CutRelay.for_url(url)
    await relay.start()
    broker = RabbitMQBroker(relay.url(url), failpoints=Failpoints())
    sub = await broker.subscribe(source, group, prefetch=1)
    try:
        async with asyncio.timeout(RECEIVE):
            d = await anext(sub)
    except TimeoutError:
        _line(fd, "idle")
        os._exit(3)
    op = d.headers.get(HEADER_OPERATION_ID, "?")
    _line(fd, f"got {op}")
    try:
        await d.ack_confirmed()
    except BrokerError:
        _line(fd, f"unconfirmed {op}")
    else:
        _line(fd, f"acked {op}")
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    url, source, group, log = argv[0], argv[1], argv[2], argv[4]
    rounds, parallel = int(argv[3]), int(argv[5])
    fd = os.open(log, os.O_CREAT | os.O_APPEND | os.O_WRONLY)
    alive: dict[int, float] = {}
    started = 0
    failed = False
    while (started < rounds and not failed) or alive:
        while started < rounds and not failed and len(alive) < parallel:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                try:
                    asyncio.run(_child(url, source, group, fd))
                finally:
                    os._exit(4)
            alive[pid] = time.monotonic() + ROUND
            started += 1
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for p, deadline in list(alive.items()):
                if now > deadline:
                    _line(fd, "stuck")
                    os.kill(p, signal.SIGKILL)
                    alive[p] = now + ROUND
            time.sleep(0.002)
            continue
        alive.pop(pid, None)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
