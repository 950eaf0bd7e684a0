"""Publishing: envelopes validated and encoded (``wire``), sent with ``SendMessageBatch`` in
order, and each outcome classified -- accepted, refused (not sent: ``BrokerUnavailable`` or
``ConfigurationError``) or unknown (``PublishAmbiguous``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from replaysafe.brokers.sqs.admin import _Queue
from replaysafe.brokers.sqs.client import _Connection
from replaysafe.brokers.sqs.errors import _error_code, _not_sent
from replaysafe.brokers.sqs.wire import _chunks, _Outgoing, _outgoing
from replaysafe.clock import Clock
from replaysafe.envelope import Envelope
from replaysafe.errors import BrokerUnavailable, ConfigurationError, PublishAmbiguous
from replaysafe.failpoints import PUBLISH_AFTER_ACCEPT, PUBLISH_BEFORE_ACCEPT, Failpoints


class _Publisher:
    """Sends envelopes to one queue at a time through the connection's never-retrying
    ``send_client``, hitting the publish failpoints around each envelope. Owns no state beyond
    its settings: a publish either returns (every envelope accepted) or raises."""

    def __init__(
        self,
        conn: _Connection,
        *,
        failpoints: Failpoints,
        clock: Clock,
        default_group: str,
        max_message_bytes: int,
    ) -> None:
        self._conn = conn
        self._failpoints = failpoints
        self._clock = clock
        self._default_group = default_group
        self._max_message_bytes = max_message_bytes

    async def publish(self, queue: _Queue, envelopes: Sequence[Envelope]) -> None:
        """See ``SQSBroker.publish`` (the contract is stated there)."""
        destination = queue.name
        entries = [
            _outgoing(
                env,
                i,
                fifo=queue.fifo,
                default_group=self._default_group,
                max_message_bytes=self._max_message_bytes,
            )
            for i, env in enumerate(envelopes)
        ]
        chunks = _chunks(entries, self._max_message_bytes)
        sent = 0
        for chunk in chunks:
            for e in chunk:
                await self._failpoints.hit(PUBLISH_BEFORE_ACCEPT, self._ctx(e, destination))
            response = await self._send_batch(queue, chunk, sent, len(entries))
            accepted = {str(s["Id"]) for s in response.get("Successful") or []}
            failed = {str(f["Id"]): f for f in response.get("Failed") or []}
            for e in chunk:
                if e.params["Id"] in accepted:
                    await self._failpoints.hit(PUBLISH_AFTER_ACCEPT, self._ctx(e, destination))
            unanswered = [
                e.envelope.operation_id
                for e in chunk
                if e.params["Id"] not in accepted and e.params["Id"] not in failed
            ]
            if unanswered:
                raise PublishAmbiguous(
                    f"SQS SendMessageBatch to {destination!r} answered neither success nor "
                    f"failure for {unanswered}; retry them with the SAME operation ids"
                )
            if failed:
                self._raise_refused(destination, chunk, failed, sent, len(entries))
            sent += len(chunk)

    def _ctx(self, e: _Outgoing, destination: str) -> dict[str, Any]:
        return {
            "operation_id": e.envelope.operation_id,
            "destination": destination,
            "sleep": self._clock.sleep,
        }

    async def _send_batch(
        self, queue: _Queue, chunk: list[_Outgoing], sent: int, total: int
    ) -> dict[str, Any]:
        _, client = await self._conn.clients()
        ops = [e.envelope.operation_id for e in chunk]
        self._conn.calls["send"] += 1
        try:
            response: dict[str, Any] = await client.send_message_batch(
                QueueUrl=queue.url, Entries=[e.params for e in chunk]
            )
        except self._conn.drv.errors as exc:
            if isinstance(exc, self._conn.drv.client_error):
                _, status, _ = _error_code(exc)
                # a 5xx may have been processed (AWS says so); a 4xx was refused whole
                if status < 500:
                    raise self._conn.map(exc, "SendMessageBatch", queue.name) from exc
            elif _not_sent(self._conn.drv, exc):
                raise BrokerUnavailable(
                    f"SQS SendMessageBatch to {queue.name!r} could not connect "
                    f"({self._conn.where()}): {exc}; nothing of {ops} was sent "
                    f"({sent} of {total} envelopes were accepted before); retry later"
                ) from exc
            raise PublishAmbiguous(
                f"SQS SendMessageBatch to {queue.name!r} may or may not have been accepted "
                f"({type(exc).__name__}: {exc}) for {ops} ({sent} of {total} envelopes were "
                "accepted before); retry with the SAME envelopes"
            ) from exc
        return response

    def _raise_refused(
        self,
        destination: str,
        chunk: list[_Outgoing],
        failed: Mapping[str, Mapping[str, Any]],
        sent: int,
        total: int,
    ) -> None:
        by_id = {e.params["Id"]: e.envelope.operation_id for e in chunk}
        detail = "; ".join(
            f"{by_id[i]!r}: {f.get('Code')}: {f.get('Message')}" for i, f in failed.items()
        )
        accepted = sent + len(chunk) - len(failed)
        text = (
            f"SQS refused {len(failed)} of {len(chunk)} messages sent to {destination!r} "
            f"(NOT accepted, not ambiguous): {detail}. {accepted} of {total} envelopes were "
            f"accepted, {total - sent - len(chunk)} not attempted"
        )
        if any(str(f.get("SenderFault")).lower() == "true" for f in failed.values()):
            raise ConfigurationError(text + "; fix these messages before retrying them")
        raise BrokerUnavailable(text + "; retry the refused and unattempted ones later")
