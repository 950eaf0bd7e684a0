"""`replaysafe run`: SIGTERM stops fetching, drains in-flight handlers and settles them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from replaysafe.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_drains_in_flight_work(tmp_path: Path) -> None:
    from .conftest import free_port, subprocess_env

    out = tmp_path / "done.txt"
    port = free_port()
    env = subprocess_env(SLOW_APP_OUT=str(out))
    proc = subprocess.Popen(
        [sys.executable, "-m", "replaysafe.cli", "run", "tests.apps.slow_app:app",
         "--drain-timeout", "20", "--metrics-port", str(port)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        started = Path(str(out) + ".started")
        while not started.exists() or len(started.read_text().split()) < 4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the handlers never started"
            time.sleep(0.02)
        # the four handlers are now inside their 1 s sleep
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert "replaysafe_replay_horizon_seconds 604800.0" in metrics
        assert 'replaysafe_open_ambiguity{handler="work"} 0.0' in metrics
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped after draining" in err
    # every handler that had started finished instead of being cut off by the signal
    assert sorted(out.read_text().split()) == [f"job:{i}" for i in range(4)]


@pytest.mark.parametrize("target", ["nocolon", "tests.apps.nope:app", "tests.apps.slow_app:nope"])
def test_run_refuses_bad_targets(
    target: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLOW_APP_OUT", str(tmp_path / "x.txt"))
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(main, ["run", target])
    assert result.exit_code != 0
    assert "Error" in result.output
