"""CPU thread control for small tensor work.

Many small matrix products and optimizer steps run faster on one thread than on several (thread start-up
and synchronisation cost more than the work), above all on a busy 2-core machine; single-threaded CPU
reductions are also deterministic, which makes demo training reproducible bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import ContextManager

import torch

#: below this many elements in the largest operand, one thread is faster than two
SMALL_WORK = 1 << 22


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one CPU thread inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_threaded_if_small(numel: int, device: str | torch.device = "cpu") -> ContextManager[None]:
    """single_threaded() for CPU work whose largest operand has fewer than SMALL_WORK elements, else a no-op."""
    small = torch.device(device).type == "cpu" and numel < SMALL_WORK
    return single_threaded() if small else nullcontext()
