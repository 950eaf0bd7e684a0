"""Cheaper constructors for the ledger's per-item result objects (batch hot paths only).

``claim_many`` and ``complete_many`` build a ``Claim`` + ``Acquired`` or a ``Record`` for every
item, hundreds per round trip. These classes are frozen, slotted dataclasses, whose generated
``__init__`` sets each field through ``object.__setattr__(self, "name", value)``; the constructors
here set the same slots through their descriptors instead, about half the cost (measured on the
bench machine: Claim ~0.8 -> ~0.45 us, Record ~1.4 -> ~0.75 us). What they build is a real
instance of the class: equal to, hashed and printed like one built by calling the class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MemberDescriptorType
from typing import Any, Final, TypeVar

from replaysafe.ledger.base import Acquired, Claim, OpKey, Record, State

__all__ = ["new_acquired", "new_claim", "new_record", "slot_maker"]

_T = TypeVar("_T")


def slot_maker(cls: type[_T]) -> Callable[..., _T]:
    """A constructor for the frozen, slotted dataclass ``cls``: the same positional arguments and
    defaults as ``cls(...)``, setting the slots through their descriptors.

    Built the way dataclasses builds ``__init__`` (generated source, ``exec``). Returns ``cls``
    itself for anything but plain slotted fields (a ``__post_init__``, a default factory, an
    ``init=False`` field, a field without its slot), so it can never skip a check the class makes.
    """
    if not dataclasses.is_dataclass(cls):
        return cls
    fields = dataclasses.fields(cls)
    slots = [cls.__dict__.get(f.name) for f in fields]
    if (
        hasattr(cls, "__post_init__")
        or not all(isinstance(d, MemberDescriptorType) for d in slots)
        or any(not f.init or f.default_factory is not dataclasses.MISSING for f in fields)
        or any(f.name.startswith("_rs_") for f in fields)
    ):
        return cls
    ns: dict[str, Any] = {"_rs_new": object.__new__, "_rs_cls": cls}
    params, body = [], []
    for i, (f, d) in enumerate(zip(fields, slots, strict=True)):
        ns[f"_rs_set{i}"] = d.__set__  # type: ignore[union-attr]
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            ns[f"_rs_default{i}"] = f.default
            params.append(f"{f.name}=_rs_default{i}")
        body.append(f"    _rs_set{i}(_rs_obj, {f.name})\n")
    source = (
        f"def make({', '.join(params)}):\n    _rs_obj = _rs_new(_rs_cls)\n"
        + "".join(body)
        + "    return _rs_obj\n"
    )
    exec(source, ns)
    return ns["make"]  # type: ignore[no-any-return]


#: ``Claim(key, fingerprint, token, owner, lease_until, attempt, recovered, previous_started)``
new_claim: Final[Callable[[OpKey, str, int, str, float, int, bool, bool], Claim]] = slot_maker(
    Claim
)
#: ``Acquired(claim)``
new_acquired: Final[Callable[[Claim], Acquired]] = slot_maker(Acquired)
#: ``Record(key, fingerprint, state, token, owner, lease_until, attempts, result, last_error,
#: created_at, updated_at, completed_at, unstarted_attempt)``
new_record: Final[
    Callable[
        [OpKey, str, State, int, str | None, float | None, int, str | None, str | None, float,
         float, float | None, int | None],
        Record,
    ]
] = slot_maker(Record)  # fmt: skip
