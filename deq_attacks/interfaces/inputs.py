"""The input contract of the front ends: what a batch of images and its labels must be.

Every check raises before any work starts, naming the problem. There are no silent
conversions: integer images are not rescaled, labels of shape (N, 1) are not squeezed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor
ClipValues = tuple[float | np.ndarray, float | np.ndarray]
"""(low, high): floats, or per-feature arrays broadcastable to one sample's shape (ART's)."""

CLIP_TOLERANCE = 1e-6
"""How far (absolute) an input may lie outside ``clip_values`` before it is refused."""


def check_images(
    x: object, input_shape: tuple[int, ...] | None, clip_values: ClipValues | None
) -> None:
    """Raise unless ``x`` is a non-empty, finite, floating-point batch (N, *input_shape) whose
    values lie inside ``clip_values`` (None: any finite values; per-feature arrays are compared
    feature by feature). ``input_shape`` None checks only that x is a batch (N, ...). The
    range costs one pass over x and one device sync."""
    check_query(x, input_shape)
    assert isinstance(x, (np.ndarray, Tensor))
    lo, hi = _range(x)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("x contains NaN or inf")
    if clip_values is None:
        return
    low, high = (np.asarray(v, dtype=np.float64) for v in clip_values)
    if low.ndim == 0 and high.ndim == 0:
        if lo < low - CLIP_TOLERANCE or hi > high + CLIP_TOLERANCE:
            raise ValueError(
                f"x spans [{lo:.4g}, {hi:.4g}], outside clip_values [{low:g}, {high:g}]: an "
                "attack would leave the threat model; rescale the inputs or set clip_values"
            )
        return
    values = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x)
    outside = (values < low - CLIP_TOLERANCE) | (values > high + CLIP_TOLERANCE)
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} values of x lie outside their per-feature clip_values: an "
            "attack would leave the threat model; rescale the inputs or set clip_values"
        )


def check_query(x: object, input_shape: tuple[int, ...] | None) -> None:
    """Raise unless ``x`` is a non-empty floating-point batch (N, *input_shape) (``input_shape``
    None: any batch (N, ...)). Values are not checked: this is the contract of an attack's
    own queries, which ``foolbox.PyTorchModel`` passes through (EAD and VirtualAdversarial
    step a hair outside the bounds, BoundaryAttack may query NaN candidates)."""
    if not isinstance(x, (np.ndarray, Tensor)):
        raise TypeError(f"x must be a numpy array or torch tensor, got {type(x).__name__}")
    if input_shape is None:
        if x.ndim < 2:
            raise ValueError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
    elif x.ndim == 0 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"x has sample shape {tuple(x.shape[1:])}, expected {tuple(input_shape)} (batch first)"
        )
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 samples)")
    if isinstance(x, Tensor):
        floating = x.is_floating_point()
    else:
        floating = bool(np.issubdtype(x.dtype, np.floating))
    if not floating:
        raise TypeError(
            f"x has dtype {x.dtype}: images must be floating point (e.g. uint8 pixels divided "
            "by 255); they are not rescaled here"
        )


def check_bounds(bounds: object, name: str = "bounds") -> None:
    """Raise unless ``bounds`` is a pair of finite numbers (low, high) with low < high."""
    try:
        pair: tuple[Any, ...] = tuple(bounds)  # type: ignore[arg-type]
        if len(pair) != 2 or any(isinstance(v, (str, bytes, bool)) for v in pair):
            raise ValueError
        low, high = float(pair[0]), float(pair[1])
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {bounds!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"{name} must be finite with low < high, got {bounds!r}")


def check_batch_size(batch_size: object) -> None:
    """Raise unless ``batch_size`` is an int >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size}")


def _range(x: ArrayLike) -> tuple[float, float]:
    """(min, max) of x; NaN if x holds a NaN."""
    if isinstance(x, Tensor):
        with torch.no_grad():
            lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
        return float(lo), float(hi)
    return float(np.min(x)), float(np.max(x))


def check_labels(y: object, n: int, nb_classes: int) -> Tensor:
    """Class indices (n,) int64 (on y's device) from labels given as indices (n,) or as one-hot
    vectors / scores (n, nb_classes), reduced by argmax. Raise on any other shape, a count
    other than ``n``, a non-integral index, or an index outside [0, nb_classes)."""
    if not isinstance(y, (np.ndarray, Tensor)):
        raise TypeError(f"labels must be a numpy array or torch tensor, got {type(y).__name__}")
    if isinstance(y, np.ndarray) and y.dtype.kind not in "iuf":
        raise TypeError(
            f"labels have dtype {y.dtype}: give integer class indices or one-hot vectors "
            "(not booleans, text or objects)"
        )
    t = y.detach() if isinstance(y, Tensor) else torch.from_numpy(np.asarray(y))
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"labels have dtype {t.dtype}: give class indices or one-hot vectors")
    if t.dim() == 2 and t.shape[1] == nb_classes and nb_classes > 1:
        indices = t.argmax(dim=1)
    elif t.dim() == 1:
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("labels of shape (N,) must be integral class indices")
        indices = t.long()
    else:
        hint = " (squeeze it to (N,) if these are class indices)" if t.dim() == 2 else ""
        raise ValueError(
            f"labels have shape {tuple(t.shape)}: give class indices (N,) or one-hot vectors "
            f"(N, {nb_classes}){hint}"
        )
    if indices.shape[0] != n:
        raise ValueError(f"{indices.shape[0]} labels for {n} inputs")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= nb_classes):
        bad = indices[(indices < 0) | (indices >= nb_classes)]
        raise ValueError(
            f"label {int(bad[0])} is outside [0, {nb_classes}) (negative labels are not "
            "wrapped around)"
        )
    return indices


def check_binary_labels(y: object, n: int) -> Tensor:
    """Labels (n, 1) of a one-logit binary classifier as float 0/1 (on y's device); raise on
    another shape or count, or a value other than 0 and 1."""
    if not isinstance(y, (np.ndarray, Tensor)):
        raise TypeError(f"labels must be a numpy array or torch tensor, got {type(y).__name__}")
    t = y.detach() if isinstance(y, Tensor) else torch.from_numpy(np.asarray(y))
    if t.dim() != 2 or t.shape[1] != 1:
        raise ValueError(f"binary labels have shape {tuple(t.shape)}, expected (N, 1)")
    if t.shape[0] != n:
        raise ValueError(f"{t.shape[0]} labels for {n} inputs")
    t = t.double()
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("binary labels (N, 1) must be 0 or 1")
    return t.float()


def check_data(
    x: object, y: object, input_shape: tuple[int, ...] | None, nb_classes: int, where: str
) -> Tensor:
    """Raise ValueError or TypeError (one line, naming ``where``) unless ``x`` is a
    batch (N, *input_shape) of finite images in [0, 1] and ``y`` its N class indices in
    [0, nb_classes) or one-hot rows; return the indices (N,) int64."""
    try:
        check_images(x, input_shape, (0.0, 1.0))
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where} images: {error}") from None
    assert isinstance(x, (np.ndarray, Tensor))
    try:
        return check_labels(y, x.shape[0], nb_classes)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where} labels: {error}") from None


def check_model_fits(
    model: torch.nn.Module,
    x: Tensor,
    y: object,
    where: str,
    num_classes: int | None = None,
) -> int:
    """The one check that a model fits a data set, before any work; return its class count K.

    ``x`` (B, C, H, W): a few images of the data set ``where`` on the model's device; ``y``:
    every label the model will be asked about (class indices); ``num_classes``: the data set's
    class count, when known. Raise ValueError (one line) unless the model's declared
    ``input_shape`` (when it has one) is x's sample shape, an eval-mode forward without
    gradients returns logits (B, K) (the model's train mode, weights and buffers are left as
    they were), ``num_classes`` (when given) equals K, and every label lies in [0, K).
    """
    sample = tuple(x.shape[1:])
    declared = getattr(model, "input_shape", None)
    if declared is not None and tuple(declared) != sample:
        raise ValueError(
            f"the model was built for samples of shape {tuple(declared)} (its input_shape), "
            f"but {where} has {sample}: choose the model or data that fit"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    except Exception as error:  # any failure of a user's model on this data: say which
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        raise ValueError(
            f"the model does not take the images of {where} (shape {sample}): "
            f"{type(error).__name__}: {first}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the model returns {shape} for {x.shape[0]} images of {where}, expected logits "
            f"({x.shape[0]}, classes)"
        )
    classes = int(logits.shape[1])
    if num_classes is not None and num_classes != classes:
        raise ValueError(
            f"the model returns {tuple(logits.shape)} for {x.shape[0]} images of {where}, "
            f"expected logits ({x.shape[0]}, {num_classes}) for its {num_classes} classes"
        )
    labels = torch.as_tensor(np.asarray(y)) if not isinstance(y, Tensor) else y
    if labels.numel() and int(labels.max()) >= classes:
        raise ValueError(
            f"{where} has label {int(labels.max())}, but the model has {classes} outputs"
        )
    return classes
