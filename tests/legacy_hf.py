"""Running a script against transformers <= 5.8 (the legacy SegFormer layout).

The legacy release cannot share a process with the current one, so it lives in its own directory
(``SEGFORMER_FAST_HF_LEGACY``, installed by .ci/run) and scripts run in a subprocess with that
directory first on the path."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_legacy(script: str) -> str:
    """Run ``script`` with the legacy transformers; returns its stdout, fails with its output."""
    legacy = os.environ.get("SEGFORMER_FAST_HF_LEGACY")
    if not legacy:
        if os.environ.get("CI"):
            pytest.fail("CI must set SEGFORMER_FAST_HF_LEGACY (see .ci/run)")
        pytest.skip("set SEGFORMER_FAST_HF_LEGACY to a directory holding transformers<=5.8 (CI does)")
    path = os.pathsep.join([legacy, TESTS, os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=path),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "legacy 4." in r.stdout, r.stdout
    return r.stdout
