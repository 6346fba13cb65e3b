"""GPU speed-ups as one frozen set of options, shared by training and evaluation.

``Acceleration(compile=True, bf16=True, ...)``: ``check(device)`` refuses options the device
cannot serve, ``apply(model)`` compiles and converts the model in place (its state dict, and
so its checkpoints, keep their keys and values), ``inputs(x)`` gives a batch the model's
memory format and ``autocast(device)`` is the reduced-precision context of forward passes.
With every option off (the default) nothing changes: the model, its inputs and its numbers
are exactly those of plain float32 eager execution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deq_attacks.deq import DEQ

#: torch.compile's modes; the two marked use CUDA graphs (static shapes, CUDA only).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


@dataclass(frozen=True)
class Acceleration:
    """Speed-up options; all off by default.

    Args:
        compile: ``torch.compile`` the DEQ's ``f`` (every solver step, unrolling step and
            backward VJP runs it), or a whole non-DEQ model, in place.
        compile_mode: torch.compile's mode: "default", "reduce-overhead" (CUDA graphs: for
            static shapes, i.e. fixed batch sizes), "max-autotune" (CUDA graphs too),
            "max-autotune-no-cudagraphs".
        compile_backend: torch.compile's backend ("inductor"; "aot_eager" traces without
            generating code, for checking).
        channels_last: convolution weights and 4-D inputs in channels-last memory format.
        tf32: TensorFloat-32 matmuls and cuDNN convolutions (CUDA only).
        bf16: bfloat16 autocast of forward passes (CUDA only); losses stay float32.
    """

    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    channels_last: bool = False
    tf32: bool = False
    bf16: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid acceleration: " + "; ".join(problems))

    def problems(self, device: str | None = None) -> list[str]:
        """Every invalid option, each as one message; with ``device`` ("cpu" or "cuda"), the
        options that device cannot serve too."""
        out = []
        for name in ("compile", "channels_last", "tf32", "bf16"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.compile_mode not in COMPILE_MODES:
            out.append(f"compile_mode must be one of {', '.join(COMPILE_MODES)}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            out.append(f"compile_backend must be a backend name, got {self.compile_backend!r}")
        customised = self.compile_mode != "default" or self.compile_backend != "inductor"
        if not self.compile and customised:
            out.append("compile_mode and compile_backend apply only with compile=true")
        if device is not None and device != "cuda":
            if self.bf16:
                out.append("bf16 autocast is for CUDA only; on CPU run in float32 (drop bf16)")
            if self.tf32:
                out.append("tf32 is a CUDA matmul/convolution mode (drop tf32 on CPU)")
            if self.compile and self.compile_mode in CUDA_GRAPH_MODES:
                out.append(f"compile_mode {self.compile_mode!r} uses CUDA graphs: CUDA only")
        return out

    def check(self, device: str | torch.device) -> None:
        """Raise ValueError if ``device`` cannot serve these options."""
        kind = device.type if isinstance(device, torch.device) else device
        problems = self.problems(kind)
        if problems:
            raise ValueError("invalid acceleration: " + "; ".join(problems))

    @property
    def active(self) -> bool:
        return self.compile or self.channels_last or self.tf32 or self.bf16

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert (channels_last) and compile ``model`` in place; returns it (an unknown
        compile backend raises ValueError here, before any work). For a DEQ only
        ``f`` is compiled (the solver's Python loop, per-sample stopping and the readout stay
        eager); the penalty of ``JacobianRegularization`` runs f eagerly (no double backward
        through compiled code). Compiling turns off AOT autograd's donated buffers for the
        process: a DEQ backward runs one graph's backward many times (``retain_graph``: the
        adjoint solve of the exact gradient, the spectral radius' power iteration), which
        donated buffers forbid."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            check_compile_backend(self.compile_backend)
            _allow_repeated_backwards()
            target = model.f if isinstance(model, DEQ) else model
            target.compile(mode=self.compile_mode, backend=self.compile_backend)
        return model

    def inputs(self, x: Tensor) -> Tensor:
        """``x`` in the model's memory format (channels-last for 4-D batches if asked)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @contextmanager
    def autocast(self, device: str | torch.device) -> Iterator[None]:
        """The precision of forward passes on ``device``: bfloat16 autocast and/or TF32
        (restored on exit); plain float32 with both off. Raises for options ``device`` cannot
        serve (bf16 or tf32 off CUDA)."""
        self.check(device)
        kind = device.type if isinstance(device, torch.device) else device
        with contextlib.ExitStack() as stack:
            if self.tf32 and kind == "cuda":
                stack.enter_context(_tf32())
            if self.bf16 and kind == "cuda":
                stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            yield


def check_compile_backend(backend: str) -> None:
    """Raise ValueError, listing torch's backends, unless ``backend`` is one of them."""
    backends = torch.compiler.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(f"unknown compile backend {backend!r}; torch has {', '.join(backends)}")


def _allow_repeated_backwards() -> None:
    """Turn off AOT autograd's donated buffers for the process: a DEQ backward runs one
    compiled graph's backward many times (``retain_graph``), which donated buffers forbid."""
    import torch._functorch.config as aot_config

    aot_config.donated_buffer = False


def compiled_f(deq: DEQ, backend: str = "inductor", mode: str = "default") -> DEQ:
    """A DEQ over the same injection, head, solver and settings as ``deq`` (every module and
    parameter shared, nothing copied) whose f runs through ``torch.compile`` (``dynamic=True``:
    any batch size); ``deq`` itself is not changed (``Acceleration.apply`` compiles in place)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    check_compile_backend(backend)
    _allow_repeated_backwards()
    f = torch.compile(deq.f, backend=backend, mode=mode, dynamic=True)
    return DEQ(
        f,  # type: ignore[arg-type]
        deq.injection,
        deq.head,
        solver=deq.solver,
        training_gradient=deq.training_gradient,
        readout=deq.readout,
        raise_on_divergence=deq.raise_on_divergence,
        resets=deq.resets,
        input_shape=deq.input_shape,
    ).eval()


@contextmanager
def _tf32() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
