"""Package metadata seen from Python: ``cggr_fn.__version__``.

What the wheel ships (py.typed, LICENSE, every module) is checked on the built
wheel in a fresh environment by .ci/check_wheel.py, which CI runs after this suite.
"""

import importlib.metadata
import pathlib
import subprocess
import sys

import cggr_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_is_the_installed_distribution_version():
    assert cggr_fn.__version__ == importlib.metadata.version("cggr-fn")


def test_version_says_unknown_when_not_installed():
    # A source tree that was never installed has no metadata: the version must
    # say so, not invent a release number.
    code = (
        "import importlib.metadata as m\n"
        "def version(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = version\n"
        "import cggr_fn\n"
        "print(cggr_fn.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "0+unknown"
