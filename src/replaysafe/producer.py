"""Publishing with the guarantee's retry rule.

An ambiguous publish (the broker may or may not have accepted it) is the first place duplicates
are born. Under at-most-once the producer never retries (it may lose); under at-least-once and
effectively-once it retries with the SAME envelope — same operation id, same first publish time —
so the broker may hold two transport copies of one operation, which consumers deduplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from replaysafe import observe as o
from replaysafe.brokers.base import Publisher
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import Envelope
from replaysafe.errors import ConfigurationError, PublishAmbiguous
from replaysafe.guarantees import Guarantee


@dataclass(frozen=True, slots=True)
class PublishResult:
    #: publish calls made (1 + retries)
    attempts: int
    #: ambiguous outcomes seen
    ambiguous: int
    #: True when the last call returned normally (boundary PUBLISHED reached)
    confirmed: bool


class Producer:
    """Publishes envelopes and applies the guarantee's rule to ambiguous outcomes."""

    def __init__(
        self,
        publisher: Publisher,
        guarantee: Guarantee,
        *,
        max_attempts: int = 5,
        backoff: float = 0.05,
        clock: Clock = SYSTEM_CLOCK,
        stats: o.Stats | None = None,
    ) -> None:
        self.publisher = publisher
        self.guarantee = guarantee
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.clock = clock
        self.stats = stats or o.Stats()

    async def publish(
        self, destination: str, envelopes: Envelope | Sequence[Envelope]
    ) -> PublishResult:
        """Publish ``envelopes`` (one envelope, or a sequence of them), stamping their first
        publish time once.

        At-most-once: one call; an ambiguous outcome is counted and given up (may lose).
        Otherwise: retried with the same envelopes up to ``max_attempts`` calls; if every call
        is ambiguous the last ``PublishAmbiguous`` is raised (the caller must keep the operation
        and retry later with the same id).
        """
        now = self.clock.now()
        batch = [envelopes] if isinstance(envelopes, Envelope) else list(envelopes)
        for env in batch:
            if not isinstance(env, Envelope):
                raise ConfigurationError(
                    f"publish() takes an Envelope or a sequence of them, got "
                    f"{type(env).__name__}; build them with Envelope.of(operation_id, payload)"
                )
        stamped = [e.with_published_at(now) for e in batch]
        ambiguous = 0
        attempts = 0
        while True:
            attempts += 1
            try:
                await self.publisher.publish(destination, stamped)
                return PublishResult(attempts, ambiguous, True)
            except PublishAmbiguous:
                ambiguous += 1
                self.stats.inc(o.PUBLISH_AMBIGUOUS, destination=destination)
                if self.guarantee is Guarantee.AT_MOST_ONCE:
                    return PublishResult(attempts, ambiguous, False)
                if attempts >= self.max_attempts:
                    raise
                await self.clock.sleep(self.backoff * attempts)
