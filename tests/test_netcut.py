"""The loopback relay the chaos harness and the demo cut (replaysafe.testing.netcut)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from replaysafe.testing.netcut import CutRelay


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def relay() -> AsyncIterator[CutRelay]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = CutRelay.for_url(f"tcp://user:pw@127.0.0.1:{port}/vhost")
    await r.start()
    try:
        yield r
    finally:
        await r.close()
        server.close()
        await server.wait_closed()


async def _roundtrip(
    relay: CutRelay, payload: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(payload)
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.readexactly(len(payload)) == payload
    return reader, writer


async def test_url_keeps_scheme_credentials_and_path(relay: CutRelay) -> None:
    assert (
        relay.url("amqp://guest:guest@10.0.0.9:5672/v")
        == f"amqp://guest:guest@127.0.0.1:{relay.port}/v"
    )
    assert relay.url("amqp://10.0.0.9:5672") == f"amqp://127.0.0.1:{relay.port}"


def test_a_url_without_a_port_is_refused() -> None:
    with pytest.raises(ValueError, match="no host and port"):
        CutRelay.for_url("amqp://localhost/")


async def test_cut_resets_both_sides_and_the_relay_keeps_accepting(relay: CutRelay) -> None:
    reader, writer = await _roundtrip(relay, b"hello")
    assert relay.live == 1
    assert relay.cut() == 1
    async with asyncio.timeout(5):
        # the client reads a reset (or EOF): the connection is gone, not stalled
        with contextlib.suppress(ConnectionError):
            assert await reader.read(10) == b""
    writer.close()
    assert relay.live == 0 and relay.cuts == 1
    assert relay.cut() == 0  # nothing left to cut
    _, w2 = await _roundtrip(relay, b"again")  # a reconnect goes through
    assert relay.connections == 2
    w2.close()


async def test_held_replies_arrive_only_after_release(relay: CutRelay) -> None:
    reader, writer = await _roundtrip(relay, b"x")
    relay.hold_replies()
    writer.write(b"held")
    await writer.drain()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reader.readexactly(4)
    relay.release()
    async with asyncio.timeout(5):
        assert await reader.readexactly(4) == b"held"
    writer.close()


async def test_an_unreachable_upstream_closes_the_client() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens there any more
    r = CutRelay("127.0.0.1", port)
    await r.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionError):
                assert await reader.read(10) == b""
        writer.close()
        assert r.live == 0
    finally:
        await r.close()
