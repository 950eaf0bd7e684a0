"""The chaos matrix: its faults, brokers, ledgers, effects and guarantees, which cells apply,
the run configuration, the matrix result, and which operations each fault targets."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from replaysafe.chaos.checker import RunResult
from replaysafe.guarantees import Guarantee

FAULTS = (
    "crash_after_effect",
    "crash_after_claim",
    "visibility_overlap",
    "pause_beyond_lease",
    "rebalance",
    "ambiguous_publish",
    "key_reuse",
    "poison",
    "ledger_restart",
    "broker_restart",
    "response_lost",
    "redrive_applied",
    "beyond_horizon",
    "relay_crash",
)
BROKERS = ("memory", "rabbitmq", "sqs", "kafka", "nats")
LEDGERS = ("sqlite", "postgres", "redis")
EFFECTS = ("keyed", "transactional", "unkeyed")
GUARANTEES = tuple(g.value for g in Guarantee)

#: share of operations each fault targets (at least 2)
FAULT_RATE = 0.04


def applicable(fault: str, *, broker: str, ledger: str, effect: str, guarantee: str) -> str | None:
    """None when the cell makes sense, else why it is left out of ``all``."""
    if effect == "transactional" and guarantee != Guarantee.EFFECTIVELY_ONCE.value:
        return "a transactional effect is effectively-once by definition"
    if effect == "transactional" and ledger == "redis":
        return "Redis is not a transactional ledger"
    if fault == "ledger_restart" and ledger == "sqlite":
        return "SQLite has no server connection to cut"
    if fault == "broker_restart" and broker != "rabbitmq":
        return (
            "a RabbitMQ fault (the workers' connections to the server are cut: unacked "
            "deliveries are requeued); SQS has no connection to cut, and restarting moto or "
            "Tansu (memory storage) would wipe the messages themselves"
        )
    if fault == "rebalance" and broker not in ("kafka", "memory"):
        return "consumer-group rebalances are a Kafka (offset) fault"
    if fault == "visibility_overlap" and broker not in ("sqs", "memory"):
        return "needs a visibility timeout (SQS)"
    if fault == "visibility_overlap" and effect == "transactional" and ledger == "sqlite":
        return (
            "SQLite serialises transactions: a handler slower than the visibility timeout holds "
            "the ledger's write lock, so no second copy can even be claimed"
        )
    if fault == "response_lost" and effect == "transactional":
        return "a transactional effect has no response to lose"
    if fault == "crash_after_claim" and guarantee != Guarantee.EFFECTIVELY_ONCE.value:
        return "only effectively-once claims"
    if fault == "redrive_applied" and guarantee == Guarantee.AT_MOST_ONCE.value:
        return "at-most-once completes before the handler: nothing is quarantined to redrive"
    if fault == "pause_beyond_lease" and broker == "rabbitmq":
        return "a stopped RabbitMQ consumer keeps its messages until its connection dies"
    return None


@dataclass(slots=True)
class ChaosConfig:
    broker: str = "memory"
    ledger: str = "sqlite"
    effects: tuple[str, ...] = ("keyed",)
    guarantees: tuple[str, ...] = GUARANTEES
    faults: tuple[str, ...] = FAULTS
    ops: int = 200
    workers: int = 3
    seed: int = 7
    lease: float = 1.5
    concurrency: int = 8
    workdir: str | None = None
    broker_url: str | None = None
    ledger_url: str | None = None
    #: per-run wall-clock bound (seconds)
    run_timeout: float = 90.0
    #: cells run at the same time (each has its own queue, ledger and sink run)
    parallel: int = 1
    #: explicit cells (guarantee, effect, fault); overrides the product of the lists above
    cells: list[tuple[str, str, str]] | None = None

    def matrix(self) -> list[tuple[str, str, str]]:
        if self.cells is not None:
            return list(self.cells)
        out = []
        for effect in self.effects:
            for guarantee in self.guarantees:
                for fault in self.faults:
                    why = applicable(
                        fault,
                        broker=self.broker,
                        ledger=self.ledger,
                        effect=effect,
                        guarantee=guarantee,
                    )
                    if why is None:
                        out.append((guarantee, effect, fault))
        return out


@dataclass(slots=True)
class Matrix:
    broker: str
    ledger: str
    ops: int
    seed: int
    runs: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "ledger": self.ledger,
            "ops": self.ops,
            "seed": self.seed,
            "runs": [r.as_json() for r in self.runs],
        }


def op_id(i: int) -> str:
    return f"chaos-op:{i}"


def pick_targets(ops: int, seed: int, fault: str) -> list[str]:
    """The operations a fault targets: the same for every guarantee and effect of one seed."""
    rng = random.Random(f"{seed}:{fault}")
    n = min(ops, max(2, round(ops * FAULT_RATE)))
    return [op_id(i) for i in sorted(rng.sample(range(ops), n))]


#: on real brokers the transactional and unkeyed effects run under the faults that hit the
#: worker process itself; producer-side faults (ambiguous publish, relay crash, key reuse,
#: redrive, horizon) are effect-independent there and run with the keyed effect
PROCESS_FAULTS = frozenset(
    {"crash_after_effect", "crash_after_claim", "pause_beyond_lease", "visibility_overlap",
     "rebalance", "poison", "response_lost", "broker_restart"}
)  # fmt: skip
#: the visibility timeout (s) of an SQS queue in a visibility_overlap run: the smallest whole value
SQS_OVERLAP_VISIBILITY = 1
#: Kafka: every worker restart costs a group rejoin, so fewer cells still
KAFKA_FAULTS = frozenset({"crash_after_effect", "pause_beyond_lease", "rebalance"})


def default_cells(broker: str, ledger: str) -> list[tuple[str, str, str]]:
    """The small matrix asserted by the tests: effectively-once with a keyed effect under every
    applicable fault; the transactional and unkeyed effects under every fault on the memory
    broker and under the process faults on real brokers (``PROCESS_FAULTS``; ``KAFKA_FAULTS``
    on Kafka); plus the three contrast cells under ``crash_after_effect``."""
    eo = Guarantee.EFFECTIVELY_ONCE.value
    cells = []
    for effect in EFFECTS:
        for fault in FAULTS:
            if applicable(fault, broker=broker, ledger=ledger, effect=effect, guarantee=eo):
                continue
            if broker != "memory" and effect != "keyed":
                subset = KAFKA_FAULTS if broker == "kafka" else PROCESS_FAULTS
                if fault not in subset:
                    continue
            cells.append((eo, effect, fault))
    cells += [
        (Guarantee.AT_LEAST_ONCE.value, "unkeyed", "crash_after_effect"),
        (Guarantee.AT_LEAST_ONCE.value, "keyed", "crash_after_effect"),
        (Guarantee.AT_MOST_ONCE.value, "unkeyed", "crash_after_effect"),
    ]
    return cells
