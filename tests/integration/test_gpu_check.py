"""The prepared accelerator check (``bench/gpu_check.py``) runs clean in its CPU dry run.

On a CUDA machine the same script is the one GPU check (``make gpu-check``); here it runs with
``--device cpu --quick`` in a fresh interpreter: every check must pass, the summary must count
them all, and the exit status must say so. The host-read, AMP, DDP and deterministic-doctor
checks are the simulated accelerator checks of the contract ("On accelerators").
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType

import pytest

from tests._dist import REPO_ROOT


def _gpu_check() -> ModuleType:
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    return gpu_check


@pytest.mark.ddp
@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO_ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in lines] == ["PASS"] * 7, proc.stdout[-4000:]
    assert "gpu_check summary: 7 of 7 checks passed" in proc.stdout
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.ddp
@pytest.mark.slow
def test_gpu_check_fails_loudly_on_a_failing_check() -> None:
    gpu_check = _gpu_check()

    def broken(device: object, quick: bool) -> str:
        raise AssertionError("relative error 1.0e+00 > 1e-04")

    original = gpu_check.CHECKS["layers"]
    gpu_check.CHECKS["layers"] = broken
    try:
        assert gpu_check.main(["--device", "cpu", "--quick", "--only", "layers"]) == 1
    finally:
        gpu_check.CHECKS["layers"] = original
