"""Build the wheel, install it into a fresh environment and run the README quickstart against it.

Usage (from .ci/run, after the test suite): ``.venv/bin/python .ci/check_wheel.py``

The test suite runs against the editable install, which reads the source tree
and so cannot notice a file that the wheel leaves out. This script checks what
users get:

1. the wheel holds every file of the package that git tracks (``py.typed``
   included), nothing outside the package, the LICENSE, and the metadata
   version and license of pyproject.toml;
2. installed (not editable) with the CI constraints into a new virtual
   environment, the README's quickstart block runs from a directory outside
   the repository, and the ``cggr_fn`` it imports is the installed one (in
   that environment's site-packages), with ``__version__`` equal to the
   wheel's version and ``py.typed`` next to it.

It exits non-zero with a message naming the first check that fails. It needs
Python >= 3.11 (``tomllib``), as CI has; the library itself supports 3.10.
"""

from __future__ import annotations

import email
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "cggr_fn"
CONSTRAINTS = ROOT / "requirements" / "ci.txt"

# Runs in the fresh environment, from outside the repository, after the quickstart.
PROBE = """
import importlib.metadata, json, pathlib, sys, sysconfig
import cggr_fn
package = pathlib.Path(cggr_fn.__file__).resolve().parent
print(json.dumps({
    "package": str(package),
    "purelib": str(pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()),
    "version": cggr_fn.__version__,
    "metadata_version": importlib.metadata.version("cggr-fn"),
    "py_typed": (package / "py.typed").is_file(),
    "sys_path": sys.path,
}))
"""


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    with tempfile.TemporaryDirectory(prefix="cggr_fn_wheel_") as tmp:
        tmp = pathlib.Path(tmp)
        wheel = timed("build the wheel", build_wheel, tmp / "dist")
        check_wheel_contents(wheel, project)
        python = timed("install it into a fresh venv", install, wheel, tmp / "venv")
        workdir = tmp / "user"
        workdir.mkdir()
        timed("run the README quickstart", run, python, quickstart(), workdir)
        probe = json.loads(run(python, PROBE, workdir))
        check_installed(probe, project["version"])
    print(f"check_wheel: OK ({wheel.name})")


def build_wheel(dist: pathlib.Path) -> pathlib.Path:
    # Build from a copy of the git-tracked files, as a clean clone has them: an
    # in-tree build would reuse a stale *.egg-info/SOURCES.txt, which can list a
    # file that the packaging configuration no longer ships.
    source = dist.parent / "source"
    for name in git_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(source)],
        check=True,
    )
    wheels = list(dist.glob("*.whl"))
    if len(wheels) != 1:
        fail(f"expected one wheel in {dist}, found {[w.name for w in wheels]}")
    return wheels[0]


def check_wheel_contents(wheel: pathlib.Path, project: dict) -> None:
    tracked = git_files(PACKAGE)
    if f"{PACKAGE}/py.typed" not in tracked:
        fail(f"{PACKAGE}/py.typed is not tracked by git")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = sorted(set(tracked) - names)
        if missing:
            fail(f"the wheel lacks tracked package files: {missing}")
        dist_info = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
        if len(dist_info) != 1:
            fail(f"expected one .dist-info directory in the wheel, found {sorted(dist_info)}")
        (dist_info,) = dist_info
        stray = sorted(name for name in names if name.split("/")[0] not in (PACKAGE, dist_info))
        if stray:
            fail(f"the wheel holds files outside {PACKAGE}/: {stray}")
        if f"{dist_info}/licenses/LICENSE" not in names:
            fail(f"the wheel lacks {dist_info}/licenses/LICENSE")
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
    expected = {"Version": project["version"], "License-Expression": project["license"]}
    for field, value in expected.items():
        if metadata[field] != value:
            fail(f"wheel METADATA {field}: expected {value!r} (pyproject.toml), got {metadata[field]!r}")

def git_files(*paths: str) -> list[str]:
    """Tracked files that exist in the working tree (uncommitted edits included, deletions honoured)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", *paths], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    return [name for name in listed if name and (ROOT / name).is_file()]


def install(wheel: pathlib.Path, venv: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS), str(wheel)],
        check=True,
    )
    return python


def quickstart() -> str:
    """The README's quickstart block, verbatim: the first ``python`` block under ``## Quickstart``."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quickstart\n(.*?)^## ", readme, re.DOTALL | re.MULTILINE)
    block = section and re.search(r"```python\n(.*?)```", section.group(1), re.DOTALL)
    if not block:
        fail("README.md has no ```python block under '## Quickstart'")
    return block.group(1)


def run(python: pathlib.Path, code: str, cwd: pathlib.Path) -> str:
    # A clean environment: no PYTHONPATH that could reach the source tree.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    result = subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"running in the installed environment failed:\n{code}\n--- stderr ---\n{result.stderr}")
    return result.stdout


def check_installed(probe: dict, version: str) -> None:
    package, purelib = pathlib.Path(probe["package"]), pathlib.Path(probe["purelib"])
    if not package.is_relative_to(purelib):
        fail(f"imported {package}, not the installed copy under {purelib} (sys.path: {probe['sys_path']})")
    if not probe["version"] == probe["metadata_version"] == version:
        fail(
            f"cggr_fn.__version__ is {probe['version']!r}, installed metadata {probe['metadata_version']!r}, "
            f"pyproject.toml {version!r}"
        )
    if not probe["py_typed"]:
        fail(f"py.typed is not installed in {package}")


def timed(what: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    print(f"check_wheel: {what}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def fail(message: str) -> None:
    sys.exit(f"check_wheel: FAILED: {message}")


if __name__ == "__main__":
    main()
