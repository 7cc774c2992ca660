import os

import torch

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when cggr_fn.kernels is
# imported: set it before any test module imports the library. On a machine with a
# GPU the kernels compile for real instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# docs/api.md is generated from the docstrings, whose examples already run as
# doctests of the modules themselves.
collect_ignore = ["docs/api.md"]
