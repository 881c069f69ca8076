"""SIGTERM and SIGINT during training: note them, let the loop finish its step and checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def deferred_signals(note: Callable[[int], None]) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT call ``note(signum)`` instead of stopping the process
    (the trainer acts on it at the end of the step, alike on every rank, and exits with 128 +
    signal). Off the main thread, where Python delivers no signals, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {
        s: signal.signal(s, lambda signum, frame: note(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
