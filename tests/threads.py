"""Pinning torch's intra-op thread count around a computation (tests/conftest.py's
`single_thread` fixture, and tests that compare two computations bit for bit: MKL/oneDNN
results differ between 1 and 2 threads)."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
