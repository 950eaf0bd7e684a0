"""`replaysafe run` as an operator meets it, each case a real `replaysafe run` process with
tests/apps/ops_app.py (issue 13 items 5, 6 and 12):

- it refuses to start, within 10 s, with one paragraph naming the fix and no traceback, when the
  ledger or the broker is not usable (wrong PostgreSQL port, a role without grants, an unmigrated
  schema, Redis down, RabbitMQ refusing the connection or the credentials);
- /healthz and /readyz follow a real ledger outage (a throwaway redis-server stopped and started
  again), and the process exits 3 after --max-ledger-outage;
- it stops cleanly on RabbitMQ + PostgreSQL (SIGTERM, SIGINT, SIGINT twice, a drain timeout that
  cuts a handler) and says what was cut; `explain` on a RabbitMQ app ends without a traceback;
- `run` and `explain` name each handler's queue and warn about queues nobody reads (RS122), and
  about the old queue of a renamed handler (RS123, on a RabbitMQ node with its management API).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replaysafe.envelope import Envelope

from .conftest import free_port, subprocess_env, unavailable

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.ops_app:app"
#: what a clean stop or a refused start must never print
NOISE = ("Traceback", "Task was destroyed", "Event loop is closed", "never awaited",
         "Exception ignored", "never retrieved")  # fmt: skip


def ops_env(tmp_path: Path, **env: str) -> dict[str, str]:
    return subprocess_env(OPS_DIR=str(tmp_path), **env)


def assert_quiet(err: str) -> None:
    for word in NOISE:
        assert word not in err, err


class Run:
    """One `replaysafe run` process; its stderr is collected by a thread as it comes."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replaysafe.cli", "run", APP, *args],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.started = time.monotonic()
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while text not in self.err:
            code = self.proc.poll()
            if code is not None:
                self._reader.join(5)
                assert text in self.err, f"exited {code} without {text!r}:\n{self.err}"
                return
            assert time.monotonic() < deadline, f"no {text!r} after {seconds}s:\n{self.err}"
            time.sleep(0.05)

    def finish(self, seconds: float = 60.0) -> int:
        try:
            code = self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"still running after {seconds}s:\n{self.err}") from None
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """Every process a test starts is killed afterwards, whatever the test did."""
    started: list[Run] = []
    yield started
    for run in started:
        run.kill()


def lines_of(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def wait_until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {seconds}s"
        time.sleep(0.05)


# --------------------------------------------------------------------------- item 5: start


def _migrate(dsn: str, schema: str) -> None:
    from replaysafe.ledger.postgres import PostgresLedger

    async def go() -> None:
        async with PostgresLedger(dsn, schema=schema, auto_migrate=True):
            pass

    asyncio.run(go())


@pytest.fixture
def role_without_grants(pg_dsn: str, pg_schema: str) -> Iterator[str]:
    """A DSN for a role that may log in but was granted nothing on a migrated ledger schema."""
    import psycopg
    from psycopg import sql

    _migrate(pg_dsn, pg_schema)
    role = f"rs_test_role_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    host = pg_dsn.split("@", 1)[1]
    yield f"postgresql://{role}@{host}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # the schema (and the grants on it) go with pg_schema; the role is cluster-wide
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _refused_start(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[dict[str, str], str]:
    """(environment, the words of the fix the paragraph must contain) for a start-up case."""
    sqlite = {"OPS_LEDGER": f"sqlite:{tmp_path / 'ledger.db'}"}
    if case == "postgres_wrong_port":
        host = request.getfixturevalue("pg_dsn").split("@", 1)[1].split(":")[0]
        dsn = f"postgresql://postgres@{host}:{free_port()}/test"
        return {"OPS_LEDGER": dsn, "OPS_SCHEMA": "replaysafe"}, "check that the server is up"
    if case == "postgres_role_without_grants":
        dsn = request.getfixturevalue("role_without_grants")
        schema = request.getfixturevalue("pg_schema")
        return {"OPS_LEDGER": dsn, "OPS_SCHEMA": schema}, f"GRANT USAGE ON SCHEMA {schema}"
    if case == "postgres_unmigrated_schema":
        dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
        return {"OPS_LEDGER": dsn, "OPS_SCHEMA": schema}, "run `replaysafe ledger migrate"
    if case == "redis_down":
        request.getfixturevalue("redis_url")  # the driver is installed
        url = f"redis://127.0.0.1:{free_port()}/0"
        return {"OPS_LEDGER": url, "OPS_PREFIX": "rs-test:"}, "check that Redis is running"
    if case == "rabbitmq_connection_refused":
        request.getfixturevalue("amqp_url")  # the driver is installed
        url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        return {**sqlite, "OPS_BROKER": url}, "check that the server runs and the URL is right"
    assert case == "rabbitmq_bad_credentials"
    url = request.getfixturevalue("amqp_url").replace("guest:guest@", "guest:wrong@")
    return {**sqlite, "OPS_BROKER": url}, "check the user and password in the URL"


@pytest.mark.parametrize("case", [
    "postgres_wrong_port", "postgres_role_without_grants", "postgres_unmigrated_schema",
    "redis_down", "rabbitmq_connection_refused", "rabbitmq_bad_credentials",
])  # fmt: skip
def test_a_worker_that_cannot_run_exits_at_start_naming_the_fix(
    case: str, request: pytest.FixtureRequest, tmp_path: Path, runs: list[Run]
) -> None:
    env, fix = _refused_start(case, request, tmp_path)
    run = Run(ops_env(tmp_path, **env))
    runs.append(run)
    code = run.finish(seconds=30)
    elapsed = time.monotonic() - run.started
    err = run.err
    assert code == 1, err
    assert elapsed < 10, f"{elapsed:.1f}s to give up:\n{err}"
    assert "running as" not in err, err
    [paragraph] = [line for line in err.splitlines() if "cannot start" in line]
    assert fix in paragraph, err
    assert "Nothing was consumed" in paragraph
    assert_quiet(err)
    assert not lines_of(tmp_path / "started")


# --------------------------------------------------------------------------- item 5: running


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class RedisServer:
    """A throwaway redis-server on a fixed port, stopped and started again at will. Its argv is
    the one ``replaysafe.testing.servers.local_redis`` builds (no persistence, files in a
    directory of the test's own); that helper picks a new port per start, and this test needs
    the same one back after an outage. Use the ``redis_server`` fixture: it always stops it."""

    def __init__(self, port: int, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            unavailable("Redis", "redis-server is not installed (apt-get install redis)")
        self.argv = [str(exe), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]  # fmt: skip
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait (bounded) until it answers PING as itself: the port may have been
        taken by another test's server while this one was down, and then ours exits."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        wait_until(self._answers, 20, f"redis-server answering on port {self.port}")

    def _answers(self) -> bool:
        import redis

        assert self.proc is not None
        code = self.proc.poll()
        assert code is None, f"redis-server exited {code} (is port {self.port} taken?)"
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=1)
        try:
            # the PING is answered, and by this process, not by a server that took the port
            return bool(client.ping()) and client.info("server")["process_id"] == self.proc.pid
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started :class:`RedisServer` on a free port; stopped afterwards, whatever happened
    (also when its first start fails)."""
    try:
        import redis  # noqa: F401 - the ledger's driver; the server is no use without it
    except ImportError:
        unavailable("Redis", "redis-py is not installed (pip install 'replaysafe[redis]')")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(free_port(), workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_readyz_follows_a_ledger_outage_and_the_worker_exits_after_the_limit(
    tmp_path: Path, runs: list[Run], redis_server: RedisServer
) -> None:
    redis = redis_server
    metrics = free_port()
    env = ops_env(tmp_path, OPS_LEDGER=f"redis://127.0.0.1:{redis.port}/0", OPS_PREFIX="rs:")
    # every interface: the scrape and the probes come from another pod
    run = Run(env, "--metrics-port", str(metrics), "--metrics-host", "0.0.0.0",
              "--max-ledger-outage", "8")  # fmt: skip
    runs.append(run)
    run.wait_for("running as")
    base = f"http://127.0.0.1:{metrics}"
    wait_until(lambda: _get(f"{base}/readyz")[0] == 200, 10, "ready")
    assert _get(f"{base}/healthz")[0] == 200
    status, body = _get(f"{base}/metrics")
    assert status == 200 and "replaysafe_replay_horizon_seconds" in body

    redis.stop()  # the ledger goes away for real
    wait_until(lambda: _get(f"{base}/readyz")[0] == 503, 10, "503 while the ledger is down")
    status, body = _get(f"{base}/readyz")
    assert "ledger: unreachable" in body and "broker: reachable" in body, body
    assert _get(f"{base}/healthz")[0] == 200  # alive: a restart is not what fixes this

    redis.start()  # back before the limit
    wait_until(lambda: _get(f"{base}/readyz")[0] == 200, 15, "ready again")
    assert run.proc.poll() is None
    run.wait_for("ledger reachable again")

    redis.stop()  # and away for longer than --max-ledger-outage
    down = time.monotonic()
    code = run.finish(seconds=60)
    waited = time.monotonic() - down
    err = run.err
    assert code == 3, err
    assert waited >= 8, f"exited {waited:.1f}s into an 8 s outage allowance:\n{err}"
    assert "the ledger has been unreachable for" in err and "--max-ledger-outage 8" in err
    assert_quiet(err)


# --------------------------------------------------------------------------- item 6: stopping


@pytest.fixture
def rabbit_pg(
    pg_dsn: str, pg_schema: str, amqp_url: str, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """Environment for ops_app on the local RabbitMQ and PostgreSQL (own schema and exchange);
    the topology is declared, so that a publish before the worker starts is kept."""
    _migrate(pg_dsn, pg_schema)
    source = f"ops-{uuid.uuid4().hex[:10]}"
    env = ops_env(tmp_path, OPS_BROKER=amqp_url, OPS_LEDGER=pg_dsn, OPS_SCHEMA=pg_schema,
                  OPS_SOURCE=source)  # fmt: skip

    async def declare() -> None:
        async with _broker(amqp_url) as b:
            await b.declare(source, ["ops.work", "ops.other"])

    asyncio.run(declare())
    yield env

    async def drop() -> None:
        async with _broker(amqp_url) as b:
            await b.delete(source, ["ops.work", "ops.other"])

    asyncio.run(drop())


class _broker:
    """``async with _broker(url) as b``: a RabbitMQBroker closed on the way out."""

    def __init__(self, url: str, **opts: Any) -> None:
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        self.broker = RabbitMQBroker(url, **opts)

    async def __aenter__(self) -> Any:
        return self.broker

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.close()


def publish(url: str, source: str, ops: list[str], **opts: Any) -> None:
    async def go() -> None:
        async with _broker(url, **opts) as b:
            await b.publish(source, [Envelope.of(op, {"op": op}) for op in ops])

    asyncio.run(go())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_and_stops_without_a_traceback(
    sig: signal.Signals, rabbit_pg: dict[str, str], tmp_path: Path, runs: list[Run]
) -> None:
    publish(rabbit_pg["OPS_BROKER"], rabbit_pg["OPS_SOURCE"], ["a:1", "a:2"])
    run = Run(rabbit_pg)
    runs.append(run)
    run.wait_for("running as")
    wait_until(lambda: len(lines_of(tmp_path / "done")) == 2, 30, "both handled")
    run.proc.send_signal(sig)
    code = run.finish()
    err = run.err
    assert code == 0, err
    assert f"{sig.name}: draining 0 in flight, up to 30s; Ctrl-C again to stop now" in err
    assert "stopped after draining: nothing was cut" in err.rstrip().splitlines()[-1], err
    assert_quiet(err)


def test_a_second_sigint_stops_at_once_and_says_what_was_cut(
    rabbit_pg: dict[str, str], tmp_path: Path, runs: list[Run]
) -> None:
    publish(rabbit_pg["OPS_BROKER"], rabbit_pg["OPS_SOURCE"], ["slow:1"])
    run = Run({**rabbit_pg, "OPS_SECONDS": "120"}, "--drain-timeout", "120")
    runs.append(run)
    wait_until(lambda: lines_of(tmp_path / "started") == ["slow:1"], 30, "the handler started")
    run.proc.send_signal(signal.SIGINT)
    run.wait_for("draining 1 in flight, up to 120s; Ctrl-C again to stop now")
    run.proc.send_signal(signal.SIGINT)
    second = time.monotonic()
    code = run.finish(seconds=30)
    err = run.err
    assert code == 130, err  # 128 + SIGINT
    assert time.monotonic() - second < 10, err  # not the 120 s drain
    [last] = [line for line in err.splitlines() if "handler run(s) cut" in line]
    assert (
        "stopped at once (second signal); 1 handler run(s) cut: 1 work run(s): their "
        "claims expire within 5s, then the redelivered copy runs again" in last
    ), err
    assert "stopped after draining" not in err
    assert_quiet(err)
    assert not lines_of(tmp_path / "done")


def test_a_drain_timeout_that_cuts_a_handler_says_so_and_the_work_runs_again(
    rabbit_pg: dict[str, str], tmp_path: Path, runs: list[Run]
) -> None:
    publish(rabbit_pg["OPS_BROKER"], rabbit_pg["OPS_SOURCE"], ["slow:2"])
    run = Run({**rabbit_pg, "OPS_SECONDS": "120"}, "--drain-timeout", "1")
    runs.append(run)
    wait_until(lambda: lines_of(tmp_path / "started") == ["slow:2"], 30, "the handler started")
    run.proc.send_signal(signal.SIGTERM)
    code = run.finish(seconds=30)
    err = run.err
    assert code == 0, err
    assert "stopped after draining" not in err
    assert (
        "drain timeout reached; 1 handler run(s) cut: 1 work run(s): their claims expire "
        "within 5s, then the redelivered copy runs again (keyed(marker file)" in err
    ), err
    assert_quiet(err)
    # what the line promised: the copy comes back and runs once its claim expired
    again = Run(rabbit_pg)
    runs.append(again)
    wait_until(lambda: lines_of(tmp_path / "done") == ["slow:2"], 40, "the cut work ran again")
    again.proc.send_signal(signal.SIGTERM)
    assert again.finish() == 0, again.err
    assert_quiet(again.err)


def test_explain_on_a_rabbitmq_app_names_the_queue_and_ends_cleanly(
    rabbit_pg: dict[str, str], tmp_path: Path
) -> None:
    source = rabbit_pg["OPS_SOURCE"]
    publish(rabbit_pg["OPS_BROKER"], source, ["e:1", "e:2"])
    out = subprocess.run(
        [sys.executable, "-m", "replaysafe.cli", "explain", APP, "--json"],
        env={**rabbit_pg, "OPS_MANAGEMENT": ""}, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert_quiet(out.stderr)
    [h] = json.loads(out.stdout)["handlers"]
    assert h["queue"] == f"{source}/ops.work"
    assert h["queue_state"] == {"messages": 2, "consumers": 0, "exists": True}
    assert any(f"reads {source}/ops.work; now 2 message(s) waiting" in s for s in h["statement"])
    [rs122] = [f for f in h["findings"] if f["id"] == "RS122"]
    assert rs122["severity"] == "warning" and f"{source}/ops.work holds 2" in rs122["message"]


# --------------------------------------------------------------------------- item 12: queues


def test_run_names_its_queues_and_warns_about_a_handler_nobody_runs(
    rabbit_pg: dict[str, str], tmp_path: Path, runs: list[Run]
) -> None:
    source = rabbit_pg["OPS_SOURCE"]
    publish(rabbit_pg["OPS_BROKER"], source, ["w:1", "w:2"])
    env = {**rabbit_pg, "OPS_HANDLERS": "work:keyed,other:keyed", "OPS_MANAGEMENT": ""}
    run = Run(env, "--handler", "work")
    runs.append(run)
    run.wait_for("running as")
    run.wait_for("RS122")
    err = run.err
    assert f"work reads {source}/ops.work (2 waiting)" in err, err
    assert (
        f"RS122 other: {source}/ops.other holds 2 message(s) and has no consumer; this "
        "worker does not run it (--handler)" in err
    ), err
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.err
    assert_quiet(run.err)


@pytest.fixture(scope="module")
def rabbitmq_management(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from replaysafe.testing.servers import ServerUnavailable

    from .rabbitmq_node import rabbitmq_with_management

    try:
        with rabbitmq_with_management(tmp_path_factory.mktemp("rabbitmq")) as node:
            yield node
    except ServerUnavailable as exc:
        unavailable("RabbitMQ with the management plugin", str(exc))


def test_a_renamed_handler_is_warned_about_its_old_queue(
    rabbitmq_management: tuple[str, str], tmp_path: Path, runs: list[Run]
) -> None:
    amqp, management = rabbitmq_management
    source = f"orders-{uuid.uuid4().hex[:8]}"

    async def v1_declares() -> None:  # the first version of the app ran: its queue exists
        async with _broker(amqp) as b:
            await b.declare(source, ["shop.charge"])

    asyncio.run(v1_declares())
    publish(amqp, source, ["o:1", "o:2", "o:3"])
    # the second version renamed its handler charge -> capture, so its default group too
    env = ops_env(tmp_path, OPS_BROKER=amqp, OPS_MANAGEMENT=management, OPS_APP="shop",
                  OPS_SOURCE=source, OPS_HANDLERS="capture:keyed",
                  OPS_LEDGER=f"sqlite:{tmp_path / 'ledger.db'}")  # fmt: skip
    run = Run(env)
    runs.append(run)
    run.wait_for("running as")
    run.wait_for("RS123")
    err = run.err
    assert f"capture reads {source}/shop.capture" in err
    assert (
        f"RS123 {source}/shop.charge holds 3 message(s) published to '{source}' and has no "
        "consumer, and no handler of shop reads group 'shop.charge'" in err
    ), err
    assert "give the handler group='shop.charge'" in err
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.err
    # explain says it too, as a finding
    out = subprocess.run([sys.executable, "-m", "replaysafe.cli", "explain", APP, "--json"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert_quiet(out.stderr)
    [h] = json.loads(out.stdout)["handlers"]
    assert h["queue"] == f"{source}/shop.capture"
    assert [f["id"] for f in h["findings"] if f["id"].startswith("RS12")] == ["RS123"]
