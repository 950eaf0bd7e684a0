"""Guarantees, boundaries and effect declarations: the words of the guarantee statement.

A handler declares one ``Guarantee`` (required, no default) and one ``Effect``. Together they decide
what the runtime does around the handler and what ``explain`` may honestly promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Guarantee(StrEnum):
    """What a handler promises about its business effect, on every broker alike.

    ============== ============================== ========= ==============
    guarantee      completion at the broker       may lose  may duplicate
    ============== ============================== ========= ==============
    AT_MOST_ONCE   before the effect              yes       no
    AT_LEAST_ONCE  after the effect               no        yes
    EFFECTIVELY_ONCE ledger claim, effect, ledger no        no, at the named boundary
                   complete, then the broker
    ============== ============================== ========= ==============
    """

    AT_MOST_ONCE = "at-most-once"
    AT_LEAST_ONCE = "at-least-once"
    EFFECTIVELY_ONCE = "effectively-once"


class Boundary(StrEnum):
    """The four boundaries an operation crosses. "Processed" is not one event."""

    PUBLISHED = "PUBLISHED"  # the broker accepted the publish
    DELIVERED = "DELIVERED"  # a handler received a copy
    EFFECTED = "EFFECTED"  # the business effect is durably true
    COMPLETED = "COMPLETED"  # the broker recorded completion (ack / delete / offset commit)


EffectKind = Literal["transactional", "keyed", "unkeyed"]
OnUnknown = Literal["quarantine", "retry"]


@dataclass(frozen=True, slots=True)
class Effect:
    """Where the handler's business effect lands, which decides where replay stops hurting.

    Build one with :meth:`transactional`, :meth:`keyed` or :meth:`unkeyed`.
    """

    kind: EffectKind
    name: str
    on_unknown: OnUnknown = "quarantine"

    @classmethod
    def transactional(cls, name: str = "ledger database") -> Effect:
        """The effect is a write in the ledger's own database; the ledger row commits in the same
        transaction (the handler receives it as ``ctx.tx``). Replay stops hurting at the commit."""
        return cls("transactional", name)

    @classmethod
    def keyed(cls, name: str) -> Effect:
        """The downstream ``name`` accepts an idempotency key; the handler passes
        ``ctx.idempotency_key`` with the effect. Replay stops hurting at ``name``."""
        return cls("keyed", name)

    @classmethod
    def unkeyed(cls, name: str, *, on_unknown: OnUnknown = "quarantine") -> Effect:
        """The downstream ``name`` cannot deduplicate. After a crash or a lost lease the outcome
        is unknown: by default the operation is quarantined as ``outcome_unknown``; with
        ``on_unknown="retry"`` it is re-run and the guarantee is at-least-once at ``name``."""
        if on_unknown not in ("quarantine", "retry"):
            raise ValueError(f"on_unknown must be 'quarantine' or 'retry', not {on_unknown!r}")
        return cls("unkeyed", name, on_unknown)

    @property
    def reruns_when_unknown(self) -> bool:
        """Whether an attempt whose outcome is unknown (a crash or lost lease mid-effect, a cut
        deadline, a handler raising :class:`~replaysafe.errors.OutcomeUnknown`) may be run again.

        True for ``transactional`` (an unfinished transaction rolled back) and ``keyed`` (the
        re-run carries the same idempotency key) effects, and for ``unkeyed`` ones that opted into
        ``on_unknown="retry"``; False for a plain ``unkeyed`` effect, which is quarantined as
        ``outcome_unknown`` instead of being re-run blindly."""
        return self.kind != "unkeyed" or self.on_unknown == "retry"

    def describe(self) -> str:
        if self.kind == "transactional":
            return f"transactional({self.name})"
        if self.kind == "keyed":
            return f"keyed({self.name})"
        return f"unkeyed({self.name}, on_unknown={self.on_unknown})"
