"""``replaysafe._redact.scrub``: a driver's message never carries a password a URL gave, in any
spelling :func:`~replaysafe._redact.secrets_of` finds (the Redis ledger's errors go through it)."""

from __future__ import annotations

from replaysafe._redact import scrub, secrets_of


def test_scrub_removes_every_spelling_of_the_password() -> None:
    secrets = secrets_of("redis://u:p%40ss@h:6379/0")
    assert scrub("auth failed for 'p@ss' (p%40ss)", secrets) == "auth failed for '***' (***)"
    query = secrets_of("unix:///tmp/r.sock?db=0&password=pw")
    assert scrub("WRONGPASS pw", query) == "WRONGPASS ***"


def test_scrub_without_secrets_leaves_the_text_alone() -> None:
    assert scrub("connection refused", secrets_of("redis://h:6379/0")) == "connection refused"
    assert scrub("connection refused", ()) == "connection refused"


def test_a_query_password_is_scrubbed_as_the_driver_decodes_it() -> None:
    # redis-py reads the query as a form: "a+b" is the password "a b"
    assert scrub("bad password a b", secrets_of("redis://h/0?password=a+b")) == "bad password ***"
