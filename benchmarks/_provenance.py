"""What a benchmark result was measured with, beyond the versions: the source it ran.

A checkout copied to a GPU machine may carry a git ``HEAD`` older than its
files (the copy holds the working tree, not the commits made since), so the
commit alone can mislead: it is marked ``+modified`` when tracked files
differ from it, and every result also records a digest of the library's
source files, which identifies the code whatever git says::

    python benchmarks/_provenance.py   # the digest of this checkout's cggr_fn/
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=_ROOT).stdout.strip()


def source_commit() -> str:
    """The git commit of this checkout, ``+modified`` if tracked files differ from it ("unknown" outside git)."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        return commit + ("+modified" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_digest() -> str:
    """SHA-256 (first 12 hex digits) of every ``.py`` file under ``cggr_fn/``, by relative path and content."""
    digest = hashlib.sha256()
    for path in sorted((_ROOT / "cggr_fn").rglob("*.py")):
        digest.update(os.fsencode(path.relative_to(_ROOT).as_posix()) + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


if __name__ == "__main__":
    print(source_digest())
