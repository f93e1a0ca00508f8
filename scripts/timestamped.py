"""Run a command and prefix every line it prints (stdout and stderr) with the seconds since it
started; at the end, report the longest stretch with no output.

    python scripts/timestamped.py train --shards data/smollm2135m_l0 ...

A carriage return ends a line as a newline does, so every redraw of a tqdm bar counts as output.
The command's exit status is this script's. The report goes to stderr, last:
`longest gap: 4.21 s (before: <the line that ended it>)`.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Callable


@dataclass
class Timeline:
    """Lines of output as they arrived: (seconds since start, text), and the gaps between them."""

    start: float = field(default_factory=time.monotonic)
    lines: list[tuple[float, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def now(self) -> float:
        return time.monotonic() - self.start

    def add(self, at: float, text: str) -> None:
        """Record one line whose first byte arrived `at` seconds after the start."""
        with self._lock:
            self.lines.append((at, text))

    def longest_gap(self, end: float) -> tuple[float, int]:
        """(seconds, index of the line after the gap; len(lines) for the gap before the end) of
        the longest stretch without output, counting from the start to `end`."""
        times = [0.0] + sorted(at for at, _ in self.lines) + [end]
        gaps = [(b - a, i) for i, (a, b) in enumerate(zip(times, times[1:]))]
        return max(gaps)


def split_lines(stream: IO[bytes], emit: Callable[[float, str], None], clock: Callable[[], float]) -> None:
    """Call `emit(at, line)` for each line of `stream` until it ends, `at` being `clock()` when the
    line's first byte arrived: a line ends at '\n' or '\r' (empty pieces dropped), and a tqdm bar
    writes '\r' before each redraw, not after, so a redraw is on screen long before it ends."""
    pending, began = b"", 0.0
    while chunk := stream.read1(65536):
        arrived = clock()
        if not pending:
            began = arrived
        pending += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *whole, pending = pending.split(b"\n")
        for i, line in enumerate(whole):
            if line:
                emit(began if i == 0 else arrived, line.decode(errors="replace"))
        if whole:  # what is pending now began in this chunk
            began = arrived
    if pending:
        emit(began, pending.decode(errors="replace"))


def run(command: list[str], out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    """Run `command`, its lines stamped onto `out` / `err`; the gap report on `err`. Returns its status."""
    timeline = Timeline()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def pump(stream: IO[bytes], to: IO[str]) -> None:
        def emit(at: float, line: str) -> None:
            timeline.add(at, line)
            to.write(f"[{at:8.2f}] {line}\n")
            to.flush()

        split_lines(stream, emit, timeline.now)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out)),
               threading.Thread(target=pump, args=(proc.stderr, err))]
    for t in threads:
        t.start()
    status = proc.wait()
    for t in threads:
        t.join()
    end = timeline.now()
    gap, index = timeline.longest_gap(end)
    ordered = sorted(timeline.lines, key=lambda line: line[0])
    where = f"before: {ordered[index][1][:80]}" if index < len(ordered) else "before the command ended"
    err.write(f"longest gap: {gap:.2f} s ({where}); {len(ordered)} lines in {end:.2f} s, exit status {status}\n")
    err.flush()
    return status


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/timestamped.py COMMAND [ARGS...]")
    try:
        sys.exit(run(sys.argv[1:]))
    except FileNotFoundError:
        sys.exit(f"timestamped: command not found: {sys.argv[1]}")


if __name__ == "__main__":
    main()
