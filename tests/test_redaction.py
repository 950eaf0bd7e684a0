"""Issue 13 item 16 (redaction) and item 9d (what a quarantine log line names).

The app's redaction hook (``App(redact=...)``) sees everything a quarantine writes down about a
message: the body copy, the detail (exception reprs and bad-input messages quote payload
values) and the operation id in the log line (ids are derived from business fields). A hook
that fails never keeps a message retrying: nothing of the body is stored, the entry and a log
line say so, the original is completed. Operation ids never become metric label values.
"""

from __future__ import annotations

import logging
import re

import pytest

from replaysafe import Context, Effect, Envelope, Guarantee, QuarantineReason, RetryPolicy
from replaysafe import observe as o
from replaysafe.observe.prometheus import render
from replaysafe.redrive import redrive

from .runtime_harness import EMAIL, Harness, mask_emails

EO = Guarantee.EFFECTIVELY_ONCE


class Rejected(Exception):
    """The downstream refused the address (not retried)."""


def _signup(h: Harness, *, flaky_once: bool = False) -> None:
    """An effectively-once signup keyed by the e-mail: the operation id carries it."""
    failed: set[str] = set()

    async def signup(ctx: Context) -> None:
        email = ctx.payload["email"]
        if flaky_once and email not in failed:
            failed.add(email)
            raise RuntimeError("mailer timeout")  # retried: the copy comes back (redelivered)
        raise Rejected(f"mailbox {email} does not exist")

    h.handler(EO, effect=Effect.keyed("mailer"), lease=5, key=lambda p: ("signup", p["email"]),
              retry=RetryPolicy(give_up_on=(Rejected,), base_delay=0.1))(signup)  # fmt: skip


def _no_email(text: str) -> None:
    assert EMAIL.decode() not in text, text


async def test_a_failing_redaction_hook_stores_no_copy_and_still_quarantines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 16a: the hook raised inside the quarantine, the message was nacked and retried forever
    # (78 times in 2.5 min); now it is quarantined on its first attempt without a copy
    h = Harness()

    def broken_hook(body: bytes) -> bytes:
        raise ValueError(f"cannot parse {body!r}")  # its message quotes the body

    h.app.redact = broken_hook
    _signup(h)
    await h.publish_raw(b'{"email": "ann@example.com"}', {})
    await h.publish_raw(b'{"email": ', {})  # bad input: no operation id, no fingerprint
    await h.publish_raw(b'{"email": "x', {})  # another one: must stay its own entry
    caplog.set_level(logging.WARNING, logger="replaysafe.runtime")
    h.start()
    await h.drain(seconds=30)
    await h.stop()
    entries = await h.ledger.quarantined()
    assert sorted(e.reason for e in entries) == sorted(
        [QuarantineReason.NON_RETRYABLE_ERROR, *[QuarantineReason.MALFORMED_PAYLOAD] * 2]
    )
    for e in entries:
        assert e.message is None and e.attempts == 1 and e.seen == 1, e
        assert "the redaction hook raised ValueError on the body: no copy of it was stored" in (
            e.first_detail
        )
        # the hook failed on the detail too: withheld, never stored unredacted
        assert e.first_detail.startswith("(detail withheld"), e.first_detail
    assert h.total(o.RETRIES) == 0 and h.depth() == 0  # completed at the broker, once
    results = await redrive(h.app, entries)
    assert not any(r.redriven for r in results)
    kept_none = [r for r in results if "no copy of the message was kept" in r.detail]
    assert len(kept_none) == 1  # the decoded one; the bad input is refused as bad input
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("redaction hook raised ValueError" in m for m in errors)
    for r in caplog.records:
        _no_email(r.getMessage())


async def test_redaction_covers_details_log_lines_and_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 16b: the hook covered the body only; first_detail, the WARNING line and the metric label
    # replaysafe_redelivered_keys{key="..."} still carried the e-mail
    h = Harness()
    h.app.redact = mask_emails
    _signup(h, flaky_once=True)
    await h.publish_raw(b'{"email": "ann@example.com"}', {})
    caplog.set_level(logging.WARNING, logger="replaysafe.runtime")
    h.start()
    await h.drain(seconds=30)
    # the same operation with another payload: a key-reuse conflict names the operation
    await h.publish_raw(b'{"email": "ann@example.com", "plan": "pro"}', {})
    await h.drain(seconds=30)
    await h.stop()
    entries = {e.reason: e for e in await h.ledger.quarantined()}
    assert set(entries) == {QuarantineReason.NON_RETRYABLE_ERROR,
                            QuarantineReason.KEY_REUSE_CONFLICT}  # fmt: skip
    rejected = entries[QuarantineReason.NON_RETRYABLE_ERROR]
    assert rejected.first_detail == "Rejected('mailbox <email> does not exist')"
    assert rejected.message == b'{"email": "<email>"}'
    for e in entries.values():
        _no_email(e.first_detail + e.last_detail)
        # the ledger keys the operation by its id: that column keeps it (redrive needs it)
        assert e.operation_id == "signup:ann@example.com"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    for line in warnings:
        _no_email(line)
        assert "operation signup:<email>" in line
    text = render(lambda: [w.stats for w in h.workers])
    assert h.total(o.REDELIVERIES) >= 1  # the key was counted as redelivered ...
    assert re.search(r'replaysafe_redelivered_keys\{handler="signup",rank="1"\} 1', text), text
    _no_email(text)  # ... and exported without it


async def test_a_hook_that_cannot_read_text_withholds_the_detail_and_the_operation_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a JSON-minded hook fails on the detail text: withheld, never logged as it was
    import json

    def mask_json(body: bytes) -> bytes:
        doc = json.loads(body)
        doc["email"] = "<email>"
        return json.dumps(doc).encode()

    h = Harness()
    h.app.redact = mask_json
    _signup(h)
    await h.publish_raw(b'{"email": "ann@example.com"}', {})
    caplog.set_level(logging.WARNING, logger="replaysafe.runtime")
    h.start()
    await h.drain(seconds=30)
    await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.message == b'{"email": "<email>"}'
    assert entry.first_detail == "(detail withheld: the redaction hook failed on it)"
    [line] = [r.getMessage() for r in caplog.records]
    _no_email(line)
    assert f"entry {entry.id} (operation withheld)" in line


async def test_quarantine_log_lines_name_the_entry_and_the_operation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 9d: the line named the transport's delivery id; `quarantine show` takes the entry id
    h = Harness()

    async def charge(ctx: Context) -> None:
        raise Rejected("card declined")

    h.handler(EO, effect=Effect.keyed("payments"), lease=5,
              retry=RetryPolicy(give_up_on=(Rejected,)))(charge)  # fmt: skip
    await h.publish(Envelope.of("charge:c1", {"card": "x"}))
    await h.publish_raw(b"{oops", {"rs-operation-id": "charge:c2"})
    caplog.set_level(logging.WARNING, logger="replaysafe.runtime")
    h.start()
    await h.drain(seconds=30)
    await h.stop()
    entries = {e.reason: e for e in await h.ledger.quarantined()}
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    rejected = entries[QuarantineReason.NON_RETRYABLE_ERROR]
    bad = entries[QuarantineReason.MALFORMED_PAYLOAD]
    assert any(
        f"quarantined entry {rejected.id} (operation charge:c1) as non_retryable_error" in m
        for m in lines
    ), lines
    # bad input has no operation id: the line names the entry and the transport copy
    assert any(f"quarantined entry {bad.id} (delivery " in m for m in lines), lines
