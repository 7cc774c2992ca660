"""Triton kernels, registered as torch custom ops under the ``cggr_fn`` namespace.

Importing this package compiles nothing; kernels are built on first launch.
On a machine without CUDA, set ``TRITON_INTERPRET=1`` before importing it to
run the kernels on CPU tensors (slowly, for tests).
"""

from cggr_fn.kernels.ops import fused_token_stats, token_stats_op

__all__ = ["fused_token_stats", "token_stats_op"]
