"""docs/migration.md covers every public name of the seed documents.

The seed documents (cggr 0.2.0 on PyPI and the later CGGR repository README)
are not part of this repository, so their public names are listed here; the
guide's code blocks themselves run as doctests (pytest --doctest-glob=*.md).
"""

import pathlib

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migration.md"

SEED_NAMES = [
    # classes and functions
    "CGGRWrapper", "CGGRLoss", "CGGRModel", "CGGRScorer", "create_truncated_router",
    "load_model_with_flash_attention", "enable_flash_attention", "PersistentTRMLP", "create_persistent_tr_mlp",
    # arguments and methods
    "num_buckets", "warmup_steps", "leak_rate", "min_tokens_ratio", "min_tokens_per_sequence", "scoring",
    "selection", "num_strata", "dynamic_threshold", "threshold_sensitivity", "model.step()", "criterion.step()",
    "state_dict", "info",
    # modules
    "triton_kernels.py", "cggr_async.py", "cggr_checkpointing.py", "cggr_dataloader.py", "cggr_flash.py",
    "persistent_cggr_kernels.py",
]


@pytest.mark.parametrize("name", SEED_NAMES)
def test_guide_maps_seed_name(name):
    assert f"`{name}" in GUIDE.read_text(), f"docs/migration.md does not mention the seed's `{name}`"
