"""Where autoexplain keeps what it builds or checkpoints: ``$AUTOEXPLAIN_CACHE``, else the user cache dir."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$AUTOEXPLAIN_CACHE`` if set, else the user cache dir (``~/.cache/autoexplain`` on Linux)."""
    env = os.environ.get("AUTOEXPLAIN_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("autoexplain"))
