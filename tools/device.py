"""Device choice: CUDA when present, else CPU. One function so every loader agrees."""

from __future__ import annotations

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """Return ``requested`` if given (validated), else ``cuda`` when available, else ``cpu``."""
    from autoexplain.tools.errors import InputError

    if requested is None or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError as exc:
        raise InputError(f"unknown device {requested!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {requested!r} was asked for but CUDA is not available here: use --device cpu")
    return dev
