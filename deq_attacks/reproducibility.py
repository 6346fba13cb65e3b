"""Fewer differences between x86-64 CPUs: pinned CPU kernels and one thread.

Float results on a CPU depend on which vector instructions torch's kernels use: ATen picks
AVX-512 or AVX2 code by the CPU it finds, oneDNN (convolutions) and MKL (matrix products) do
the same, and the rounding differs between them. A training run amplifies a last-bit
difference into another model: the demo trained on an AVX-512 machine and on an AVX2 machine
chose another early exit, other intermediate attacks and another most robust defense.
``pin_cpu_kernels`` makes every CPU that has AVX2 run the AVX2 code (ATen's
``ATEN_CPU_CAPABILITY``, oneDNN's ``ONEDNN_MAX_CPU_ISA``, MKL's conditional numerical
reproducibility ``MKL_CBWR``), which removes the largest source of difference. It does not make
every CPU agree: the demo's seed 0 still ended at another robust accuracy on an Intel Xeon than
on an AMD EPYC (library builds, microcode and the kernels' own choices differ), so a rerun on
one machine repeats its numbers and other machines fall in a range (README). The three are read
when torch first uses them, not when it is imported: pin before the first operation.
"""

from __future__ import annotations

import os
import platform

import torch

#: The settings, by environment variable.
PINNED_KERNELS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
}


def pin_cpu_kernels() -> str:
    """Pin torch's CPU kernels to AVX2 on an x86-64 machine (see the module docs; elsewhere
    nothing changes) and return ATen's capability in effect ("AVX2"; "DEFAULT" on a CPU
    without AVX2, whose numbers then differ). Settings the user made in the environment are
    kept. Raises if ATen chose AVX-512 already (a torch operation ran before the call)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return torch.backends.cpu.get_cpu_capability()
    added = {name: value for name, value in PINNED_KERNELS.items() if name not in os.environ}
    os.environ.update(added)  # before ATen reads it (the query below makes it choose)
    wanted = os.environ["ATEN_CPU_CAPABILITY"].upper()
    chosen = torch.backends.cpu.get_cpu_capability()
    if chosen.startswith("AVX512") and not wanted.startswith("AVX512"):
        for name in added:  # nothing pinned: the environment is left as it was
            del os.environ[name]
        raise RuntimeError(
            f"torch's CPU kernels are {chosen}, not {wanted}: pin_cpu_kernels() must run before "
            "the first torch operation (or set ATEN_CPU_CAPABILITY in the environment)"
        )
    return chosen
