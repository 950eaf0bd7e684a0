"""A throwaway RabbitMQ node with the management plugin, for the one check that needs to list
queues (``RabbitMQBroker.stray_groups``: AMQP 0-9-1 cannot, the management HTTP API can).

The machine's RabbitMQ (5672) runs without the plugin, and enabling it there would change a
shared server; this node runs from the same installation under its own node name, ports and data
directory, and is stopped (its process group) afterwards. Boot takes about 10 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from replaysafe.testing.servers import ServerUnavailable, free_port

#: seconds the node gets to answer on its management port
BOOT_TIMEOUT = 60.0


def _server() -> str:
    for candidate in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
        if candidate and Path(candidate).exists():
            return candidate
    raise ServerUnavailable("RabbitMQ: rabbitmq-server is not installed")


def _answers(url: str) -> bool:
    request = urllib.request.Request(
        url,
        headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="},  # guest:guest
    )
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def rabbitmq_with_management(workdir: Path) -> Iterator[tuple[str, str]]:
    """Yields ``(amqp_url, management_url)`` of a fresh node (guest/guest, loopback only)."""
    exe = _server()
    amqp, web, dist = free_port(), free_port(), free_port()
    (workdir / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
        f"management.tcp.port = {web}\nmanagement.tcp.ip = 127.0.0.1\n"
    )
    (workdir / "enabled_plugins").write_text("[rabbitmq_management].\n")
    env = {
        **os.environ,
        "HOME": str(workdir),  # its own Erlang cookie
        "RABBITMQ_NODENAME": f"rs-test-{amqp}@localhost",
        "RABBITMQ_NODE_PORT": str(amqp),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "log"),
        "RABBITMQ_CONF_ENV_FILE": os.devnull,  # not the machine node's name and settings
    }
    log = (workdir / "node.log").open("wb")
    proc = subprocess.Popen([exe], env=env, stdout=log, stderr=log, start_new_session=True)
    management = f"http://127.0.0.1:{web}"
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not _answers(f"{management}/api/overview"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"RabbitMQ node did not start (exit status {proc.poll()}); see "
                    f"{workdir / 'node.log'}"
                )
            time.sleep(0.5)
        yield f"amqp://guest:guest@127.0.0.1:{amqp}/", management
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
