"""``subprocess_env`` (tests/conftest.py): a Python subprocess a test starts imports this
checkout's replaysafe and ``tests`` package, whatever else its interpreter could import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, subprocess_env

WHERE = "import replaysafe, tests; print(replaysafe.__file__); print(tests.__file__)"


def test_a_subprocess_imports_this_checkout_before_any_other_copy(tmp_path: Path) -> None:
    # another copy of the package ahead of this one (as another checkout's install would be)
    other = tmp_path / "other"
    (other / "replaysafe").mkdir(parents=True)
    (other / "replaysafe" / "__init__.py").write_text("")
    env = subprocess_env({**os.environ, "PYTHONPATH": str(other)}, EXTRA_VAR="1")
    out = subprocess.run([sys.executable, "-c", WHERE], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    package, tests = out.stdout.split()
    assert Path(package) == ROOT / "src" / "replaysafe" / "__init__.py", out.stdout
    assert Path(tests) == ROOT / "tests" / "__init__.py", out.stdout
    # the caller's own entries are kept, after this checkout's; extra variables are set
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "src"), str(ROOT), str(other)]
    assert env["EXTRA_VAR"] == "1"


def test_a_pythonpath_given_by_the_test_comes_after_this_checkout() -> None:
    env = subprocess_env({"PYTHONPATH": "/base"}, PYTHONPATH="/mine")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "src"), str(ROOT), "/mine", "/base"]
