"""Write docs/api.md from the public docstrings: `python docs/gen_api.py`.

tests/test_docs.py fails when docs/api.md is stale, so the reference can never
drift from the code.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys

MODULES = ("cggr_fn", "cggr_fn.models", "cggr_fn.distributed", "cggr_fn.testing")
API_PATH = pathlib.Path(__file__).with_name("api.md")


def _entry(module_name: str, name: str, obj: object) -> str:
    doc = inspect.cleandoc(obj.__doc__ or "")
    if inspect.isclass(obj):
        heading = f"class {module_name}.{name}"
    elif not callable(obj):
        # A constant: its value is its documentation (a docstring would be its type's).
        return f"### `{name}`\n\n```python\n{module_name}.{name} = {obj!r}\n```\n"
    else:
        signature = str(inspect.signature(obj)).replace("'", "")
        heading = f"{module_name}.{name}{signature}"
    return f"### `{name}`\n\n```python\n{heading}\n```\n\n{doc}\n"


def render() -> str:
    parts = [
        "# API reference\n",
        "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.\n",
    ]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        summary = inspect.cleandoc(module.__doc__ or "").splitlines()[0]
        parts.append(f"## `{module_name}`\n\n{summary}\n")
        parts.extend(_entry(module_name, name, getattr(module, name)) for name in sorted(module.__all__))
    return "\n".join(parts)


if __name__ == "__main__":
    API_PATH.write_text(render())
    sys.stdout.write(f"wrote {API_PATH}\n")
