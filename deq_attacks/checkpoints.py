"""Model checkpoints as safetensors, checked against the model they are loaded into."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the model's state dict (parameters and buffers) to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors checkpoint into ``model``; the model is untouched on any mismatch.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing or unexpected keys, or tensors whose shapes differ, all listed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    saved = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            problems.append("shape mismatch " + "; ".join(shapes[:5]))
        raise ValueError(f"checkpoint {path} does not fit the model: " + ", ".join(problems))
    model.load_state_dict(saved)
    return model
