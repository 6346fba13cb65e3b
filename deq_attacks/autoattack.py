"""fra31/auto-attack's front door over the original attack code.

``from autoattack import AutoAttack`` is fra31's module name (installed from its GitHub
repository, not from PyPI); the PyPI package this project installs, ``pyautoattack`` 0.2.0,
ships the same APGD, FAB and Square code under the module ``pyautoattack`` with another
constructor (keyword-only, ``attacks=``), ``batch_size=`` and Python logging instead of
printing. This class takes fra31's arguments and behaviour and runs pyautoattack's attacks::

    from deq_attacks.autoattack import AutoAttack

    adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=0)
    x_adv = adversary.run_standard_evaluation(x_test, y_test, bs=250)

``model`` is any torch module returning logits, e.g. ``estimator.model`` of a
``DEQEstimator`` (the defended logits, with the estimator's gradient estimate).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyautoattack
import torch
from torch import Tensor, nn

#: The logger pyautoattack reports through.
LOGGER = "auto-attack"


class AutoAttack:
    """fra31's ``AutoAttack(model, norm, eps, seed, verbose, attacks_to_run, version,
    is_tf_model, device, log_path)`` over ``pyautoattack.AutoAttack``.

    ``verbose`` prints the attack's progress to stdout (and ``log_path`` appends it to a file),
    as fra31's own logger does, with no logging set up by the caller. Attributes that fra31's
    users set (``adversary.apgd.n_restarts = 1``, ``adversary.attacks_to_run = [...]``) reach
    the pyautoattack object.

    Args:
        model: a torch module returning logits (N, classes) for inputs in [0, 1].
        norm: "Linf", "L2" or "L1".
        eps: the radius.
        seed: the attacks' seed (None: the clock, as in fra31).
        verbose: print progress.
        attacks_to_run: with ``version="custom"``, the attacks ("apgd-ce", "apgd-t", "fab-t",
            "square", ...); with another version it must stay empty.
        version: "standard", "plus", "rand" or "custom".
        is_tf_model: TensorFlow models are not supported (must be False).
        device: where the attacks run.
        log_path: a file the progress is appended to (with ``verbose``).
    """

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 0.3,
        seed: int | None = None,
        verbose: bool = True,
        attacks_to_run: Sequence[str] = (),
        version: str = "standard",
        is_tf_model: bool = False,
        device: str | torch.device = "cuda",
        log_path: str | Path | None = None,
    ) -> None:
        if is_tf_model:
            raise ValueError("is_tf_model=True: only torch models are supported here")
        object.__setattr__(self, "log_path", None if log_path is None else Path(log_path))
        object.__setattr__(self, "verbose_output", verbose)
        with self._printing():
            inner = pyautoattack.AutoAttack(
                model,
                attacks=list(attacks_to_run) or None,
                device=device,
                eps=eps,
                norm=norm,  # type: ignore[arg-type]
                seed=seed,
                version=version,  # type: ignore[arg-type]
            )
        inner.verbose = verbose
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        inner = self.__dict__.get("_inner")
        if name == "verbose":
            object.__setattr__(self, "verbose_output", value)
        if inner is not None and hasattr(inner, name):
            setattr(inner, name, value)
        else:
            object.__setattr__(self, name, value)

    @contextmanager
    def _printing(self) -> Iterator[None]:
        """While active (and ``verbose``), pyautoattack's log goes to stdout and ``log_path``."""
        if not self.__dict__["verbose_output"]:
            yield
            return
        logger = logging.getLogger(LOGGER)
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if self.log_path is not None:
            handlers.append(logging.FileHandler(self.log_path, encoding="utf-8"))
        saved = logger.level
        logger.setLevel(logging.DEBUG)
        for handler in handlers:
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        try:
            yield
        finally:
            for handler in handlers:
                logger.removeHandler(handler)
                handler.close()
            logger.setLevel(saved)

    def run_standard_evaluation(
        self,
        x_orig: Tensor,
        y_orig: Tensor,
        bs: int = 250,
        return_labels: bool = False,
        state_path: Path | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x_adv (N, ...) of the selected attacks, in batches of ``bs`` (and the predicted
        labels with ``return_labels``); ``state_path`` resumes an interrupted evaluation
        (pyautoattack's addition)."""
        with self._printing():
            x_adv, y_adv = self._inner.run_standard_evaluation(
                x_orig, y_orig, batch_size=bs, state_path=state_path
            )
        return (x_adv, y_adv) if return_labels else x_adv

    def run_standard_evaluation_individual(
        self, x_orig: Tensor, y_orig: Tensor, bs: int = 250, return_labels: bool = False
    ) -> dict[str, Any]:
        """Each attack on its own: attack -> x_adv (or (x_adv, y_adv) with ``return_labels``)."""
        with self._printing():
            adv = self._inner.run_standard_evaluation_individual(x_orig, y_orig, batch_size=bs)
        return {name: pair if return_labels else pair[0] for name, pair in adv.items()}

    def clean_accuracy(self, x_orig: Tensor, y_orig: Tensor, bs: int = 250) -> float:
        """The model's accuracy on (x_orig, y_orig), in batches of ``bs``."""
        with self._printing():
            return float(self._inner.clean_accuracy(x_orig, y_orig, bs=bs))
