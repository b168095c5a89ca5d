"""Run an iterator a few items ahead in a background thread (reading, tokenising, assembling rows).

Used where a producer's work (numpy, Arrow, tokenizers: mostly outside the GIL) can overlap its consumer's (the
model's forward pass, DuckDB's insert). Order is preserved, the queue is bounded (``depth`` items wait at most:
memory stays bounded), and an exception raised by the producer is raised in the consumer at the item where it
happened. When the consumer stops early (an error, ``break``), the producer stops at its next item.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")


def prefetch(it: Iterator[_T], depth: int = 2, *, name: str = "prefetch") -> Iterator[_T]:
    """Yield the items of ``it``, produced by a daemon thread ``name`` at most ``depth`` items ahead."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
