"""Our Triton kernels under Triton's interpreter, on the CPU (interpreter_checks.py), one
process a check: TRITON_INTERPRET must be set before the kernels are defined."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model.interpreter_checks import CHECKS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton (the test extra installs it)")


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_under_interpreter(name):
    script = Path(__file__).with_name("interpreter_checks.py")
    root = script.parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, str(script), name], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"{name}: ok" in done.stdout
