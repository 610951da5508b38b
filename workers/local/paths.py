"""Where the local tier keeps its files: one models folder, `$FRUGAL_MODELS_DIR` or `~/.cache/frugal/models`."""

from __future__ import annotations

import os
from pathlib import Path


def models_dir() -> Path:
    """Built models live in folders here; fetched source files in its `downloads/`."""
    return Path(os.environ.get("FRUGAL_MODELS_DIR") or Path.home() / ".cache" / "frugal" / "models")
