"""An app for tests/test_cli_ops.py, run by `replaysafe run` / `replaysafe explain` as a real
OS process: one broker, one ledger, handlers named by the environment.

Environment: ``OPS_BROKER`` (``memory`` or an ``amqp://`` URL), ``OPS_LEDGER`` (a ledger spec:
``sqlite:PATH``, ``postgresql://…``, ``redis://…``), ``OPS_SCHEMA`` (PostgreSQL schema) or
``OPS_PREFIX`` (Redis key prefix), ``OPS_SOURCE`` (the destination), ``OPS_APP`` (the app name),
``OPS_HANDLERS`` (comma-separated ``name:effect`` pairs, effect ``keyed`` or ``unkeyed``;
default ``work:keyed``), ``OPS_DIR`` (where each handler run leaves a marker) and
``OPS_SECONDS`` (how long each handler run takes; default 0); ``OPS_MANAGEMENT`` (the RabbitMQ
management API URL, when not on the AMQP host's port 15672).

A handler appends ``<operation id>`` to ``OPS_DIR/started`` when it starts and to
``OPS_DIR/done`` when it finishes, so a test knows what is in flight.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from replaysafe import App, Context, Effect, Guarantee
from replaysafe.brokers import broker_from_url
from replaysafe.ledger import ledger_from_url

DIR = Path(os.environ["OPS_DIR"])
SECONDS = float(os.environ.get("OPS_SECONDS", "0"))
SOURCE = os.environ.get("OPS_SOURCE", "ops")
HANDLERS = os.environ.get("OPS_HANDLERS", "work:keyed")


def _ledger_opts(spec: str) -> dict[str, Any]:
    if spec.startswith("postgres"):
        return {"schema": os.environ["OPS_SCHEMA"], "connect_timeout": 3.0}
    if spec.startswith("redis"):
        return {"prefix": os.environ["OPS_PREFIX"]}
    return {}


_spec = os.environ["OPS_LEDGER"]
_url = os.environ.get("OPS_BROKER", "memory")
_broker_opts: dict[str, Any] = {"connect_timeout": 3.0} if _url.startswith("amqp") else {}
if "OPS_MANAGEMENT" in os.environ:
    _broker_opts["management_url"] = os.environ["OPS_MANAGEMENT"]
app = App(
    os.environ.get("OPS_APP", "ops"),
    broker=broker_from_url(_url, **_broker_opts),
    ledger=ledger_from_url(_spec, **_ledger_opts(_spec)),
)


def _make(name: str) -> Any:
    async def handler(ctx: Context) -> None:
        with (DIR / "started").open("a") as f:
            f.write(f"{ctx.operation_id}\n")
        await asyncio.sleep(SECONDS)
        with (DIR / "done").open("a") as f:
            f.write(f"{ctx.operation_id}\n")

    handler.__name__ = name
    return handler


for _item in HANDLERS.split(","):
    _name, _, _effect = _item.partition(":")
    _eff = Effect.unkeyed("marker file") if _effect == "unkeyed" else Effect.keyed("marker file")
    app.handler(SOURCE, guarantee=Guarantee.EFFECTIVELY_ONCE, effect=_eff, lease=5.0)(_make(_name))
