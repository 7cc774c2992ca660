"""What a benchmark result was measured with, beyond the versions: the source commit."""

from __future__ import annotations

import os
import subprocess


def source_commit() -> str:
    """The git commit of this checkout ("unknown" outside one), recorded with every result."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
