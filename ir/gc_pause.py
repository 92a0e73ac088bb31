"""`paused_gc()`: run a block with Python's cyclic garbage collector paused.

Why: building or rewriting a graph of 100k nodes allocates millions of objects that mostly stay
alive; each allocation burst triggers collections that walk them all again, which made loading,
parsing and optimizing large models up to twice as slow. Values and nodes refer to each other, so
the garbage a pass leaves is cyclic: it is reclaimed by the first collection after the block.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
