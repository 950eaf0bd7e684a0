"""Guarantees, boundaries and effect declarations: the words of the guarantee statement.

A handler declares one ``Guarantee`` (required, no default) and one ``Effect``. Together they decide
what the runtime does around the handler and what ``explain`` may honestly promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from replaysafe.errors import ConfigurationError, EffectNotApplied


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
    #: unkeyed only: exception types that prove the effect did not happen (see :meth:`unkeyed`)
    not_applied_on: tuple[type[BaseException], ...] = ()

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
    def unkeyed(
        cls,
        name: str,
        *,
        on_unknown: OnUnknown = "quarantine",
        not_applied_on: tuple[type[BaseException], ...] = (),
    ) -> Effect:
        """The downstream ``name`` cannot deduplicate. After a crash, a lost lease, a cut
        deadline or an exception from the handler, the outcome is unknown (the request may have
        left before the failure): by default the operation is quarantined as
        ``outcome_unknown``; with ``on_unknown="retry"`` it is re-run and the guarantee is
        at-least-once at ``name``.

        An exception is a clean failure (released and retried under the retry budget) only when
        it proves the effect did not happen: :class:`~replaysafe.errors.EffectNotApplied`, or an
        instance of a type in ``not_applied_on`` (e.g. ``(ConnectionRefusedError,)``: nothing
        was sent). List only types that are raised before anything can reach the downstream."""
        if on_unknown not in ("quarantine", "retry"):
            raise ValueError(f"on_unknown must be 'quarantine' or 'retry', not {on_unknown!r}")
        if isinstance(not_applied_on, type):
            not_applied_on = (not_applied_on,)
        if not isinstance(not_applied_on, tuple) or not all(
            isinstance(t, type) and issubclass(t, Exception) for t in not_applied_on
        ):
            raise ConfigurationError(
                f"not_applied_on must be a tuple of exception classes (e.g. "
                f"(ConnectionRefusedError,)), not {not_applied_on!r}"
            )
        return cls("unkeyed", name, on_unknown, not_applied_on)

    @property
    def reruns_when_unknown(self) -> bool:
        """Whether an attempt whose outcome is unknown (a crash or lost lease mid-effect, a cut
        deadline, a handler raising :class:`~replaysafe.errors.OutcomeUnknown`) may be run again.

        True for ``transactional`` (an unfinished transaction rolled back) and ``keyed`` (the
        re-run carries the same idempotency key) effects, and for ``unkeyed`` ones that opted into
        ``on_unknown="retry"``; False for a plain ``unkeyed`` effect, which is quarantined as
        ``outcome_unknown`` instead of being re-run blindly."""
        return self.kind != "unkeyed" or self.on_unknown == "retry"

    def not_applied(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by the handler, proves that its effect did not happen:
        :class:`~replaysafe.errors.EffectNotApplied`, or a type listed in ``not_applied_on``."""
        return isinstance(exc, (EffectNotApplied, *self.not_applied_on))

    def describe(self) -> str:
        if self.kind == "transactional":
            return f"transactional({self.name})"
        if self.kind == "keyed":
            return f"keyed({self.name})"
        listed = ", ".join(t.__name__ for t in self.not_applied_on)
        extra = f", not_applied_on=({listed})" if listed else ""
        return f"unkeyed({self.name}, on_unknown={self.on_unknown}{extra})"
