"""The embedded poetry sample as byte tokens, split and batched as pure functions of the step."""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE = Path(__file__).with_name("data") / "poetry_sample.txt"


def load_bytes(path: Path = SAMPLE) -> torch.Tensor:
    """The file's bytes as an int64 tensor: byte-level tokens, vocabulary 256, no tokenizer files."""
    return torch.tensor(list(path.read_bytes()), dtype=torch.int64)


def split(data: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous train / validation split: the last ``val_fraction`` of the text is held out.

    A contiguous tail (rather than random windows) keeps every validation byte
    out of every training window, so the validation loss measures generalisation.
    """
    cut = int(len(data) * (1.0 - val_fraction))
    return data[:cut], data[cut:]


def batch_starts(num_tokens: int, *, steps: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Window offsets for every step, drawn once from ``seed``: shape ``(steps, batch_size)``.

    Fixing the whole data order up front makes a batch a pure function of the
    step, so two training runs given the same offsets see identical data.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - seq_len - 1, (steps, batch_size), generator=generator)


def get_batch(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, each ``(len(starts), seq_len)``, for windows at ``starts``."""
    index = starts.unsqueeze(-1) + torch.arange(seq_len + 1)
    windows = data[index]
    return windows[:, :-1], windows[:, 1:]


def eval_windows(data: torch.Tensor, seq_len: int, max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows tiling (the start of) ``data``: a deterministic evaluation set."""
    count = min(max_windows, (len(data) - 1) // seq_len)
    starts = torch.arange(count) * seq_len
    return get_batch(data, starts, seq_len)
