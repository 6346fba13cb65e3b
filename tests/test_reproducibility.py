"""Pinned CPU kernels: AVX2 code on any x86-64 CPU when pinned before the first torch
operation, a clear error when pinned too late. Each case runs in a fresh interpreter (the
choice is made once per process)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PIN = "from deq_attacks.reproducibility import pin_cpu_kernels; print(pin_cpu_kernels())"

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are x86-64 kernels"
)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR",
                                                             "ONEDNN_MAX_CPU_ISA")}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def _capabilities() -> str:
    return _python("import torch; print(torch.backends.cpu.get_cpu_capability())").stdout


def test_pinned_before_any_operation_the_kernels_are_avx2() -> None:
    native = _capabilities().strip()
    if native == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    proc = _python(
        f"import torch\n{PIN}\nx = torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4), "
        "torch.ones(1, 1, 3, 3)); print(torch.backends.cpu.get_cpu_capability())"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AVX2", "AVX2"]


def test_pinned_after_an_operation_on_an_avx512_cpu_raises() -> None:
    if not _capabilities().startswith("AVX512"):
        pytest.skip("ATen chose no AVX-512 kernels here: nothing to pin too late")
    check = "import os\nbefore = dict(os.environ)\ntry:\n    pin_cpu_kernels()\n"
    check += "except RuntimeError:\n    assert dict(os.environ) == before\n    raise\n"
    proc = _python(f"import torch\ntorch.ones(64) * 2\n{PIN.split(';')[0]}\n{check}")
    assert proc.returncode != 0
    assert "must run before the first torch operation" in proc.stderr
    assert "AssertionError" not in proc.stderr  # the environment was left as it was
