"""Run an iterator in a thread, a bounded number of items ahead of its consumer.

Both stages overlap slow producers with the work that consumes them this way: harvest's
tokenization with the forward pass, train's dump reads and batch cutting with the optimizer.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")


def background(items: Iterator[T], maxsize: int, name: str) -> Iterator[T]:
    """Run an iterator in a thread, `maxsize` items ahead; errors re-raise in the consumer.

    Closing the returned generator stops the producer and joins its thread, so no thread is left
    running inside a torch op when the interpreter exits.
    """
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
            else:
                put(done)
        except BaseException as e:
            put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
