"""The CPU allocator tuning applied by the ``moekit`` command."""

import subprocess
import sys

import pytest

CODE = "from moekit.runtime import tune_cpu_allocator as t; print(t(), t())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_cpu_allocator_applies_once_and_can_be_switched_off():
    on = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"]
    off = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         env={"MOEKIT_NO_MALLOC_TUNING": "1", "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    assert off.stdout.split() == ["False", "False"]
