"""How long a request to object storage may wait for an answer, and a line on stderr while it waits.

The bound is MATS_SAE_S3_TIMEOUT seconds (or `--s3-timeout`; default 60) for each request, its
retries included: the client gives each attempt a fifth of it without an answer (no byte read,
no connection made) before it tries again, and no new attempt once the bound is near. A request
with no answer for that long says so on stderr, once per attempt:

    object storage: no answer from http://host:9000 for 12 s (s3://bucket/dump/manifest.json;
    attempt 2 of 5, giving up after 60 s: MATS_SAE_S3_TIMEOUT sets it) ...

and when the bound is reached the command fails in one line naming it (`errors.explain`).
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from shared.errors import UserError

ENV = "MATS_SAE_S3_TIMEOUT"
FLAG = "--s3-timeout"
DEFAULT_S = 60.0
ATTEMPTS = 5
_override: float | None = None
T = TypeVar("T")


def set_bound(seconds: float | None) -> None:
    """`--s3-timeout`: the bound in seconds, overriding the environment (None: back to it)."""
    global _override
    _override = None if seconds is None else check_seconds(seconds, FLAG)


def check_seconds(value: object, where: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{where} must be a number of seconds above 0 (how long a request to object storage "
                        f"may go unanswered), got '{value}'")
    return seconds


def bound() -> float:
    """Seconds a request may go without an answer, its retries included."""
    if _override is not None:
        return _override
    raw = os.environ.get(ENV, "").strip()
    return check_seconds(raw, ENV) if raw else DEFAULT_S


@dataclass(frozen=True)
class Plan:
    """The client's timeouts for a bound: `attempts` tries of `per_attempt` s each without an answer."""

    total: float
    per_attempt: float
    attempts: int

    @classmethod
    def of(cls, total: float) -> "Plan":
        per = max(1.0, total / ATTEMPTS)
        return cls(total, per, max(1, min(ATTEMPTS, round(total / per))))

    @property
    def retry_window(self) -> float:
        """No new attempt starts later than this after the first (half an attempt before the last
        one would be due to end): the last one ends by `total`, backoffs aside."""
        return max(0.0, self.total - self.per_attempt / 2)


def plan() -> Plan:
    return Plan.of(bound())


def _show(seconds: float) -> str:
    return f"{seconds:g}"


def waiting_line(endpoint: str, what: str, waited: float, p: Plan) -> str:
    attempt = min(p.attempts, int(waited // p.per_attempt) + 1)
    return (f"object storage: no answer from {endpoint} for {waited:.0f} s ({what}; attempt {attempt} of "
            f"{p.attempts}, giving up after {_show(p.total)} s: {ENV} sets it) ...")


def gave_up_line(endpoint: str) -> str:
    """The end of the one-line error of a request that got no answer within the bound."""
    return (f"no answer from the object store at {endpoint} within {_show(bound())} s ({ENV}): check that "
            f"it is up and reachable, or give it longer with {ENV}=SECONDS or {FLAG}")


class _Watch:
    """The requests in flight; one daemon thread reports the oldest one each time it has waited
    another attempt's time without an answer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inflight: dict[int, list] = {}  # id -> [start, what, endpoint, plan, attempts reported]
        self.ids = 0
        self.thread: threading.Thread | None = None
        self.say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    @contextmanager
    def request(self, what: str, endpoint: str) -> Iterator[None]:
        with self.lock:
            self.ids += 1
            key = self.ids
            self.inflight[key] = [time.monotonic(), what, endpoint, plan(), 0]
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="object-storage-waits", daemon=True)
                self.thread.start()
        try:
            yield
        finally:
            with self.lock:
                del self.inflight[key]

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            with self.lock:
                if not self.inflight:
                    continue
                entry = self.inflight[min(self.inflight)]
                start, what, endpoint, p, reported = entry
                waited = time.monotonic() - start
                due = int(waited // p.per_attempt)
                if due <= reported:
                    continue
                entry[4] = due
            try:
                self.say(waiting_line(endpoint, what, waited, p))
            except Exception:  # stderr gone: nothing to tell
                pass


WATCH = _Watch()


def call(what: str, fn: Callable[[], T]) -> T:
    """`fn()`, one blocking request (or a listing) for `what`, watched as `request` watches it.
    In the main thread it runs in a helper thread: the client's call blocks outside Python, where
    a Ctrl-C would wait for the request's end (up to the bound); the main thread's join is
    interrupted at once instead (the abandoned request ends with the process)."""
    with request(what):
        if threading.current_thread() is not threading.main_thread():
            return fn()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller as it was raised
                box["error"] = e

        helper = threading.Thread(target=run, name="object-storage-request", daemon=True)
        helper.start()
        helper.join()
        if "error" in box:
            raise box["error"]
        return box["value"]


def request(what: str) -> AbstractContextManager[None]:
    """Around one request for `what` (its URL): a line on stderr while it goes unanswered."""
    from shared.storage.s3_client import endpoint

    return WATCH.request(what, endpoint() or "AWS S3")
