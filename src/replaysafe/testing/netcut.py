"""A loopback TCP relay whose live connections can be cut or held: network faults between a
client and its server, with no server privileges.

Used by the tests (a broker adapter's reconnect and ambiguous-publish paths) and by the chaos
harness and the demo (RabbitMQ ``broker_restart`` / ``channel_closed_before_ack``): a worker
process routes its broker connections through a :class:`CutRelay` of its own
(``relay.url(broker_url)``); :meth:`CutRelay.cut` aborts every connection that crosses it, on
both sides at once. The server sees each connection drop (RabbitMQ requeues what it held
unacked, exactly as after a restart or a network failure); the client sees its socket reset and
reconnects through the relay, which keeps listening. Bytes the relay had received and not yet
forwarded are lost with the connection, as on a real network.

Why not ask the server to close the connection (``rabbitmqctl close_connection``): that needs
the server's CLI, its Erlang cookie and the right to become its user, which a CI sandbox need
not grant (measured: every ``broker_restart`` cell hit 0 times in a CI run where the same tests
passed on the developer's machine). A relay inside the worker needs nothing but loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

__all__ = ["CutRelay"]

#: bytes read per forward (a larger frame is forwarded in several writes)
_CHUNK = 65536


class CutRelay:
    """Forward every connection made to ``127.0.0.1:port`` to ``upstream``; :meth:`cut` drops
    them all; :meth:`hold_replies` stops forwarding server-to-client bytes (they queue in the
    relay: the server has accepted what it was sent, the client hears nothing) until
    :meth:`release`. Runs on the event loop that called :meth:`start`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        #: connections cut so far (each is a client-relay and relay-server socket pair)
        self.cuts = 0
        #: connections accepted so far (a reconnect counts again)
        self.connections = 0
        self._replies = asyncio.Event()
        self._replies.set()
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def for_url(cls, url: str, default_port: int | None = None) -> CutRelay:
        """A relay toward the host and port of ``url`` (``scheme://user:pass@host:port/...``;
        ``default_port`` when the URL names none)."""
        parts = urlsplit(url)
        port = parts.port or default_port
        if parts.hostname is None or port is None:
            raise ValueError(f"{url!r} names no host and port to relay to")
        return cls(parts.hostname, port)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by this relay's (after :meth:`start`)."""
        if not self.port:
            raise RuntimeError("CutRelay.url() before start(): the relay has no port yet")
        parts = urlsplit(url)
        auth, _, _ = parts.netloc.rpartition("@")
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def live(self) -> int:
        """Connections currently relayed."""
        return len(self._pairs)

    def hold_replies(self) -> None:
        """Stop forwarding what the server sends (until :meth:`release`)."""
        self._replies.clear()

    def release(self) -> None:
        """Forward what the server sent meanwhile, and from now on."""
        self._replies.set()

    def cut(self) -> int:
        """Abort every relayed connection now (both sockets, no orderly close: the peer reads a
        reset). Returns how many were cut. Safe to call from the relay's loop only."""
        pairs = list(self._pairs)
        self._pairs.clear()
        for client, server in pairs:
            client.transport.abort()
            server.transport.abort()
        self.cuts += len(pairs)
        return len(pairs)

    async def close(self) -> None:
        """Stop listening and cut what is still relayed."""
        self.release()
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.transport.abort()  # the client sees the server as unreachable
            return
        pair = (c_writer, s_writer)
        self._pairs.add(pair)
        pumps = [
            asyncio.ensure_future(self._pump(c_reader, s_writer, None)),
            asyncio.ensure_future(self._pump(s_reader, c_writer, self._replies)),
        ]
        self._tasks.update(pumps)
        try:
            # either direction ending (EOF, reset, cut) ends the connection on both sides
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            if pair in self._pairs:
                self._pairs.discard(pair)
                c_writer.close()
                s_writer.close()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event | None
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(_CHUNK):
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
