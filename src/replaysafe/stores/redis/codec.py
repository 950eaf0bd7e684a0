"""What a Redis ledger sends, as values: the record and quarantine keys, and each claim-path call
(script, keys, packed request, how to decode its reply), without any I/O. The async ledger and
its sync twin send the very same :class:`_Call` objects."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final, Generic, NamedTuple, TypeVar

from replaysafe.errors import ConfigurationError, LeaseLost, LedgerError
from replaysafe.ledger.base import (
    Claim,
    ClaimOutcome,
    ClaimRequest,
    OpKey,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    storable_text,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.redis.decode import (
    _US,
    _b,
    _claim_outcomes,
    _completions,
    _entry,
    _extended,
    _fence,
    _marked,
    _pairs,
    _us,
)
from replaysafe.stores.redis.errors import ledger_error
from replaysafe.stores.redis.scripts import _SCRIPTS, _Script

_T = TypeVar("_T")

#: most items one claim or complete script handles (one round trip each): bounds how long one
#: script blocks the server (a few ms) and the size of its request
BATCH_CHUNK: Final = 500
#: a chunk also ends once its keys and packed items pass this many bytes (large results)
BATCH_BYTES: Final = 1 << 20
#: most scopes (and owner/lease tails) whose packed form a ledger keeps between calls
_PACKED_MAX: Final = 4096

#: a record's key: prefix, "op:", the scope's byte length, scope, ":", operation id (key_for)
_KEY_HEAD: Final = b"%bop:%d:%b:"
#: packers for the scripts' requests (Lua struct "I4" and "d": little-endian)
_U32: Final = struct.Struct("<I").pack
_F64: Final = struct.Struct("<d").pack


class _Call(NamedTuple, Generic[_T]):
    """One script call, as a value: the keys and arguments to send (packed) and how to read its
    reply (``decode``). The codec builds them; a transport (async or sync) sends them."""

    script: _Script
    keys: Sequence[bytes]
    args: Sequence[bytes | str]
    decode: Callable[[list[Any]], _T]
    #: the call's name in errors
    what: str
    #: where Redis TIME is in the reply
    now_at: int = 1
    #: several items (errors then say "any item of the batch") or one
    batch: bool = False


def _as_is(reply: list[Any]) -> list[Any]:
    """The decode of a call whose caller reads the raw reply itself (the admin scripts)."""
    return reply


class _Codec:
    """What a Redis ledger sends and how it reads the replies, without any I/O.

    :class:`RedisLedger` (redis.asyncio) and :class:`SyncRedisLedger` (redis.Redis) hold the same
    codec and differ only in how they send a :class:`_Call`: every key, every packed request,
    every reply decoding and the mapping of redis-py errors to replaysafe's exist here once (the
    Lua exists once in :mod:`.scripts`, the decoding in :mod:`.decode`, the error mapping in
    :mod:`.errors`). Immutable after construction, so both ledgers and any
    number of threads may use one (its packing caches aside, which only ever hold what their
    key determines)."""

    __slots__ = (
        "_scopes", "_tails", "display", "errors", "p", "prefix", "retention", "retention_ms",
        "secrets",
    )  # fmt: skip

    def __init__(
        self,
        prefix: str,
        retention: float,
        display: str,
        secrets: Sequence[str],
        errors: Any,
    ) -> None:
        self.prefix = prefix
        self.p = _b(prefix)
        self.retention = float(retention)
        self.retention_ms = max(1, round(retention * 1000))
        self.display = display  # the URL with its password redacted
        self.secrets = tuple(secrets)  # the URL's password spellings: scrubbed from errors
        self.errors = errors  # redis.exceptions
        # a worker's scopes, owner and lease repeat across calls: each is encoded and packed once
        # (scope -> (record key head, packed scope); (owner, lease, marks_start) -> packed tail).
        # Each value depends on its key alone, so threads racing on one only compute it twice.
        self._scopes: dict[str, tuple[bytes, bytes]] = {}
        self._tails: dict[tuple[str, float, bool], bytes] = {}

    # ------------------------------------------------------------------ keys

    def key_for(self, key: OpKey) -> bytes:
        scope = _b(key.scope)
        # the byte length of the scope makes the composite unambiguous whatever it contains
        return _KEY_HEAD % (self.p, len(scope), scope) + _b(key.operation_id)

    def entry_key(self, entry_id: str) -> bytes:
        return self.p + b"q:" + _b(entry_id)

    def index(self, reason: QuarantineReason | None) -> bytes:
        """The quarantine index by creation time: all entries, or one reason's."""
        return self.p + b"qidx" + (b"" if reason is None else b":" + reason.value.encode())

    # ------------------------------------------------------------------ calls

    def claim(self, requests: Sequence[ClaimRequest], what: str) -> list[_Call[list[ClaimOutcome]]]:
        """The claim script calls for ``requests``, one per chunk (see :data:`BATCH_CHUNK`).
        Raises ``ConfigurationError`` for a bad lease (then nothing is sent)."""
        lease_us: dict[float, int] = {}
        for r in requests:
            if r.lease not in lease_us:
                lease_us[r.lease] = _us(r.lease, "lease")
        scopes, tails = self._scopes, self._tails
        if len(scopes) > _PACKED_MAX or len(tails) > _PACKED_MAX:
            scopes.clear()
            tails.clear()
        script, token_key, n, p = _SCRIPTS["claim"], self.p + b"token", len(requests), self.p
        calls: list[_Call[list[ClaimOutcome]]] = []
        lo = 0
        while lo < n:
            keys, parts, size, hi = [token_key], [], 0, lo
            while hi < n and hi - lo < BATCH_CHUNK and size < BATCH_BYTES:
                r = requests[hi]
                k = r.key
                sc = scopes.get(k.scope)
                if sc is None:
                    raw = k.scope.encode("utf-8", "surrogatepass")
                    sc = scopes[k.scope] = (_KEY_HEAD % (p, len(raw), raw), _U32(len(raw)) + raw)
                tail = tails.get((r.owner, r.lease, r.marks_start))
                if tail is None:
                    raw = r.owner.encode("utf-8", "surrogatepass")
                    marks = b"\x01" if r.marks_start else b"\x00"
                    tail = _U32(len(raw)) + raw + _F64(lease_us[r.lease]) + marks
                    tails[(r.owner, r.lease, r.marks_start)] = tail
                op = k.operation_id.encode("utf-8", "surrogatepass")
                fp = r.fingerprint.encode("utf-8", "surrogatepass")
                key = sc[0] + op
                part = b"%b%b%b%b%b%b" % (sc[1], _U32(len(op)), op, _U32(len(fp)), fp, tail)
                keys.append(key)
                parts.append(part)
                size += len(key) + len(part)
                hi += 1
            calls.append(
                _Call(script, keys, [b"".join(parts)],
                      partial(_claim_outcomes, requests[lo:hi], lease_us), what, 0, n > 1)
            )  # fmt: skip
            lo = hi
        return calls

    def complete(
        self, items: Sequence[tuple[Claim, str | None]], what: str
    ) -> list[_Call[list[Record | LeaseLost]]]:
        """The complete script calls for ``items``, one per chunk (see :data:`BATCH_CHUNK`)."""
        script, log, n = _SCRIPTS["complete"], self.p + b"completions", len(items)
        retention = str(self.retention_ms)
        scopes = self._scopes
        if len(scopes) > _PACKED_MAX:
            scopes.clear()
        calls: list[_Call[list[Record | LeaseLost]]] = []
        lo = 0
        while lo < n:
            keys, parts, size, hi = [log], [], 0, lo
            while hi < n and hi - lo < BATCH_CHUNK and size < BATCH_BYTES:
                claim, result = items[hi]
                k = claim.key
                sc = scopes.get(k.scope)
                if sc is None:
                    raw = k.scope.encode("utf-8", "surrogatepass")
                    sc = scopes[k.scope] = (
                        _KEY_HEAD % (self.p, len(raw), raw),
                        _U32(len(raw)) + raw,
                    )
                key = sc[0] + k.operation_id.encode("utf-8", "surrogatepass")
                token = b"%d" % claim.token
                if result is None:
                    part = b"%b%b\x00\x00\x00\x00\x00" % (_U32(len(token)), token)
                else:
                    raw = result.encode("utf-8", "surrogatepass")
                    part = b"%b%b\x01%b%b" % (_U32(len(token)), token, _U32(len(raw)), raw)
                keys.append(key)
                parts.append(part)
                size += len(key) + len(part)
                hi += 1
            calls.append(
                _Call(script, keys, [retention, b"".join(parts)],
                      partial(_completions, items[lo:hi]), what, 0, n > 1)
            )  # fmt: skip
            lo = hi
        return calls

    def mark_started(self, claims: Sequence[Claim]) -> list[_Call[list[Claim | LeaseLost]]]:
        """The mark_started script calls, one per chunk of at most :data:`BATCH_CHUNK` claims."""
        calls: list[_Call[list[Claim | LeaseLost]]] = []
        for lo in range(0, len(claims), BATCH_CHUNK):
            chunk = claims[lo : lo + BATCH_CHUNK]
            tokens = [b"%d" % c.token for c in chunk]
            calls.append(
                _Call(
                    _SCRIPTS["mark_started"],
                    [self.key_for(c.key) for c in chunk],
                    [b"".join(_U32(len(t)) + t for t in tokens)],
                    partial(_marked, chunk),
                    what="mark_started",
                    now_at=0,
                    batch=len(claims) > 1,
                )
            )
        return calls

    def extend(self, claim: Claim, lease: float) -> _Call[Claim]:
        lease_us = _us(lease, "lease")
        return _Call(
            _SCRIPTS["extend"],
            [self.key_for(claim.key)],
            [str(claim.token), str(lease_us)],
            lambda reply: _extended(claim, reply),
            what="extend",
        )

    def release(self, claim: Claim, error: str | None) -> _Call[None]:
        return _Call(
            _SCRIPTS["release"],
            [self.key_for(claim.key)],
            [str(claim.token), "0" if error is None else "1", _b(storable_text(error or ""))],
            lambda reply: _fence(claim, reply),
            what="release",
        )

    def quarantine(self, request: QuarantineRequest, claim: Claim | None) -> _Call[QuarantineEntry]:
        request = request.storable()
        eid = request.entry_id()
        fields: list[bytes | str] = ["scope", _b(request.scope), "reason", request.reason.value]
        for name, value in (
            ("operation_id", request.operation_id),
            ("fingerprint", request.fingerprint),
            ("content_type", request.content_type),
        ):
            if value is not None:
                fields += [name, _b(value)]
        message = request.capped_message()
        if message is not None:
            fields += ["message", message]
        # written with a new entry only (the script ignores them for a repeat): the first
        # publish time and the original size, before capping, are what a redrive decides on
        fields += ["message_size", str(len(request.message or b""))]
        if request.published_at is not None and math.isfinite(request.published_at):
            fields += ["published_at", str(round(request.published_at * _US))]
        op_key = OpKey(request.scope, request.operation_id or "") if claim is None else claim.key

        def decode(reply: list[Any]) -> QuarantineEntry:
            if claim is not None:
                _fence(claim, reply)
            return _entry(_pairs(reply[2:]))

        return _Call(
            _SCRIPTS["quarantine"],
            [self.key_for(op_key), self.entry_key(eid), self.index(None),
             self.index(request.reason)],
            [
                "0" if claim is None else "1",
                "0" if claim is None else str(claim.token),
                _b(request.detail),
                eid,
                str(request.attempts),
                request.risk.value,
                *fields,
            ],
            decode,
            what="quarantine",
        )  # fmt: skip

    # ------------------------------------------------------------------ errors

    def unavailable(
        self, exc: BaseException, what: str, *, sent: bool, batch: bool = False
    ) -> LedgerError | ConfigurationError:
        """Map a redis-py error to the replaysafe tree (:func:`.errors.ledger_error`): what
        happened, what to do next."""
        return ledger_error(
            self.errors, exc, what, display=self.display, prefix=self.prefix,
            secrets=self.secrets, sent=sent, batch=batch,
        )  # fmt: skip
