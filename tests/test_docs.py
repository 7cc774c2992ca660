"""The docs stay true: the API reference matches the docstrings, and code blocks run.

Doctest-style blocks (``>>>``) in docs/*.md run through pytest's doctest
collection; plain ``python`` blocks run here as scripts, in a real module
namespace (torch.compile resolves globals through it).
"""

import pathlib
import re
import runpy
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import gen_api  # noqa: E402

SCRIPT_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def script_blocks():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if path == gen_api.API_PATH:
            continue
        for index, block in enumerate(SCRIPT_BLOCK.findall(path.read_text())):
            if ">>>" not in block:
                yield pytest.param(block, id=f"{path.relative_to(ROOT)}[{index}]")


def test_api_reference_is_up_to_date():
    assert gen_api.API_PATH.read_text() == gen_api.render(), "docs/api.md is stale: run python docs/gen_api.py"


@pytest.mark.parametrize("block", list(script_blocks()))
def test_script_blocks_run(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block)
    runpy.run_path(str(script), run_name="docs_block")
