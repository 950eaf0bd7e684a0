"""The pause role of the Redis ledger (:class:`~replaysafe.ledger.base.HandlerControls`): one
hash, ``<prefix>paused``, with a JSON field per paused handler."""

from __future__ import annotations

import json

from replaysafe.errors import LedgerError
from replaysafe.ledger.base import HandlerControls, PauseState, check_handler_name, pause_text
from replaysafe.stores.redis.base import RedisBase
from replaysafe.stores.redis.decode import _US, _b, _s
from replaysafe.stores.redis.scripts import _SCRIPTS


class RedisControls(RedisBase, HandlerControls):
    """The :class:`~replaysafe.ledger.base.HandlerControls` role on a :class:`.RedisBase`."""

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str = "", by: str = ""
    ) -> None:
        """Pause (``HSET`` into ``<prefix>paused``, ``since`` = Redis ``TIME``) or resume
        (``HDEL``) ``handler`` in one script call. Durable as the server's persistence makes it
        (see :meth:`persistence_report`)."""
        check_handler_name(handler)
        await self._eval(
            _SCRIPTS["set_paused"],
            [self._p + b"paused"],
            [_b(handler), "1" if paused else "0", _b(pause_text(reason)), _b(pause_text(by))],
            what="set_paused",
            now_at=0,
        )

    async def paused(self) -> dict[str, PauseState]:
        """The paused handlers (one ``HGETALL`` of a hash with a field per paused handler)."""
        flat = await self._command("paused", lambda: self._client.hgetall(self._p + b"paused"))
        out: dict[str, PauseState] = {}
        for raw_name, raw_value in dict(flat).items():
            try:
                value = json.loads(raw_value)
                state = PauseState(
                    _s(raw_name), str(value["reason"]), str(value["by"]),
                    int(value["since_us"]) / _US,
                )  # fmt: skip
            except (ValueError, KeyError, TypeError) as exc:
                raise LedgerError(
                    f"{self._prefix}paused holds {raw_value!r} for {_s(raw_name)!r}, which this "
                    f"ledger did not write ({exc!r}); resume the handler to clear it, or give "
                    "the ledger a prefix of its own"
                ) from None
            out[state.handler] = state
        return out
