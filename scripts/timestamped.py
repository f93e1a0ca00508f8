"""Run a command and prefix every line it prints (stdout and stderr) with the seconds since it
started; at the end, report the longest stretch with no output.

    python scripts/timestamped.py train --shards data/smollm2135m_l0 ...

A carriage return ends a line as a newline does, so every redraw of a tqdm bar counts as output.
The command's exit status is this script's. The report goes to stderr, last:
`longest gap: 4.21 s (before line 17: ...)`.
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

    def add(self, text: str) -> float:
        """Record one line now; returns its time since start."""
        with self._lock:
            at = time.monotonic() - self.start
            self.lines.append((at, text))
            return at

    def longest_gap(self, end: float) -> tuple[float, int]:
        """(seconds, index of the line after the gap; len(lines) for the gap before the end) of
        the longest stretch without output, counting from the start to `end`."""
        times = [0.0] + [at for at, _ in self.lines] + [end]
        gaps = [(b - a, i) for i, (a, b) in enumerate(zip(times, times[1:]))]
        return max(gaps)


def split_lines(stream: IO[bytes], emit: Callable[[str], None]) -> None:
    """Call `emit` with each line of `stream`, a line ending at '\\n' or '\\r' (empty pieces between
    '\\r\\n' are dropped), until the stream ends."""
    pending = b""
    while chunk := stream.read1(65536):
        pending += chunk
        *whole, pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in whole:
            if line:
                emit(line.decode(errors="replace"))
    if pending:
        emit(pending.decode(errors="replace"))


def run(command: list[str], out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    """Run `command`, its lines stamped onto `out` / `err`; the gap report on `err`. Returns its status."""
    timeline = Timeline()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def pump(stream: IO[bytes], to: IO[str]) -> None:
        def emit(line: str) -> None:
            at = timeline.add(line)
            to.write(f"[{at:8.2f}] {line}\n")
            to.flush()

        split_lines(stream, emit)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out)),
               threading.Thread(target=pump, args=(proc.stderr, err))]
    for t in threads:
        t.start()
    status = proc.wait()
    for t in threads:
        t.join()
    end = time.monotonic() - timeline.start
    gap, index = timeline.longest_gap(end)
    where = f"before line {index + 1}: {timeline.lines[index][1][:80]}" if index < len(timeline.lines) \
        else "before the command ended"
    err.write(f"longest gap: {gap:.2f} s ({where}); {len(timeline.lines)} lines in {end:.2f} s, exit status {status}\n")
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
