"""What every fault test needs: the three commands in-process, the commands as real processes
that can be SIGKILLed, the one-line-error check, and the tally the end-of-run summary prints."""
from __future__ import annotations

import json
import re
import multiprocessing
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("FAULT_SEED", "20240610"))  # every random kill point derives from it

# ---- the tally -----------------------------------------------------------------------------------

@dataclass
class Tally:
    """Counts for the summary. Kills are recorded by the kill tests themselves (one test loops
    over many points); table entries are recorded from their reports (see conftest)."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)

    def kill(self, tool: str, point: str, verdict: str, note: str = "") -> None:
        """verdict: 'identical' (resumed to the uninterrupted bytes), 'restart' (told in one line
        to start again, and starting again gave those bytes), or 'failed'."""
        self.kills.append({"tool": tool, "point": point, "verdict": verdict, "note": note})

    def entry(self, table: str, name: str, outcome: str) -> None:
        """outcome: 'ok' (refused / one-line error as required), 'xfail', or 'failed'."""
        row = self.tables.setdefault(table, {"tried": 0, "ok": 0, "xfail": 0, "failed": 0})
        row["tried"] += 1
        row[outcome] += 1
        self.entries.append({"table": table, "name": name, "outcome": outcome})

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kills:
            by_tool: dict[str, dict[str, int]] = {}
            for k in self.kills:
                row = by_tool.setdefault(k["tool"], {"tried": 0, "identical": 0, "restart": 0, "failed": 0})
                row["tried"] += 1
                row[k["verdict"]] += 1
            total = {key: sum(r[key] for r in by_tool.values()) for key in ("tried", "identical", "restart", "failed")}
            out["kills"] = total | {"by_tool": by_tool}
        out.update(self.tables)
        return out


TALLY = Tally()

# ---- the commands in-process ---------------------------------------------------------------------

def cli_main(prog: str):
    """The click command behind `harvest`, `train` or `evaluate` (wherever evaluate lives now)."""
    if prog == "harvest":
        from harvest.cli import main
    elif prog == "train":
        from train.cli import main
    elif prog == "evaluate":
        try:
            from train.evaluation.cli import main
        except ImportError:
            from train.evaluate_cli import main
    else:
        raise ValueError(prog)
    return main


@dataclass
class Outcome:
    prog: str
    args: list[str]
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None
    """An exception that escaped the command: as a process it would have printed a traceback."""

    @property
    def traceback(self) -> bool:
        return self.exception is not None or "Traceback (most recent call last)" in self.stderr

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def describe(self) -> str:
        exc = f"\nescaped: {type(self.exception).__name__}: {self.exception}" if self.exception else ""
        return (f"{self.prog} {' '.join(self.args)} -> exit {self.code}\nstderr:\n{self.stderr}"
                f"stdout:\n{self.stdout[-2000:]}{exc}")


def invoke(prog: str, args: Sequence[Any]) -> Outcome:
    """Run a command in this process, as its console script would."""
    args = [str(a) for a in args]
    result = CliRunner().invoke(cli_main(prog), args, prog_name=prog, catch_exceptions=True)
    exc = result.exception
    if isinstance(exc, SystemExit):
        exc = None
    return Outcome(prog, args, result.exit_code, result.stdout, result.stderr, exc)


def ok(prog: str, args: Sequence[Any]) -> Outcome:
    got = invoke(prog, args)
    assert got.code == 0 and not got.traceback, got.describe()
    return got


def tiny_checkpointed_run(root: Path, name: str, seed: int, *extra: str) -> Path:
    """`root/name`: a finished run of a standard SAE (16 steps of 64 random rows, d_in 16, d_sae
    32, 8 held-out contexts) with one checkpoint at step 8, trained from `root/dump`; `extra`
    flags make it a sweep or change its settings."""
    import torch

    from shared.dump_writer import write_dump

    g = torch.Generator().manual_seed(seed)
    write_dump(root / "dump", torch.randn(2048, 16, generator=g), context_size=16, shard_rows=512)
    ok("train", ["--shards", root / "dump", "--checkpoint-path", root / name, "--expansion-factor", "2",
                 "--train-batch-size", "64", "--total-training-tokens", "1024", "--n-checkpoints", "1",
                 "--device", "cpu", "--eval-holdout-contexts", "8", "--quiet", *extra])
    return root / name


_CLICK_BANNER = ("Usage: ", "Try '")
_PROGRESS = re.compile(r"\d+%\||^\S.* \.\.\.$|^\s*\.\.\. still ")
"""What a command prints while it works (a tqdm bar's redraws, "loading model X ...", "... still
loading"): allowed before the one error line, which must then be the last line."""


def error_line(out: Outcome, strict: bool = True) -> str:
    """The one line that says what went wrong; fails the test if there is not exactly one.

    An error is `PROG: error: ...`, or click's own `Error: ...` for a malformed option (click
    prints its usage banner above that line). `strict`: nothing else on stderr; otherwise
    progress lines may come before the error, which must then be the last line.
    """
    assert out.code != 0, "expected a failure\n" + out.describe()
    assert not out.traceback, "a traceback instead of one line\n" + out.describe()
    errors = [line for line in out.lines if line.startswith((f"{out.prog}: error:", "Error: "))]
    assert len(errors) == 1, f"{len(errors)} error lines\n" + out.describe()
    if strict:
        others = [line for line in out.lines if line not in errors and not line.startswith(_CLICK_BANNER)
                  and not _PROGRESS.search(line)]
        assert not others, "more than the error on stderr\n" + out.describe()
        assert out.lines[-1] == errors[0] or out.lines[-1].startswith(_CLICK_BANNER), \
            "the error is not the last line\n" + out.describe()
    else:
        assert out.lines[-1] == errors[0], "the error is not the last line\n" + out.describe()
    return errors[0]


# ---- the commands as processes -------------------------------------------------------------------

# Imported once by the fork server: each forked command then starts in milliseconds instead of
# the ~10 s a fresh interpreter needs to import torch, transformers and TransformerLens. The
# commands still run as separate processes that a SIGKILL stops at an arbitrary instruction.
_PRELOAD = ["torch", "transformers", "transformer_lens.model_bridge", "harvest.cli", "harvest.run",
            "train.cli", "train.run", "train.sweep", "fault._support"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def warm_up() -> None:
    """Start the fork server now (it imports in the background while other tests run)."""
    run = start_forked("harvest", ["--help"], None)
    run.wait(300)


def _forked_main(prog: str, args: list[str], log: str | None) -> None:
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    import torch

    torch.set_num_threads(1)
    cli_main(prog).main(args=args, prog_name=prog)


class Running:
    """A command running as its own process."""

    def __init__(self, what: str, handle: Any, log: Path | None):
        self.what, self.handle, self.log = what, handle, log
        self.started = time.monotonic()

    def alive(self) -> bool:
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.poll() is None
        return self.handle.is_alive()

    def kill(self) -> None:
        """SIGKILL, then reap."""
        self.handle.kill()
        self.wait(60)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code; None if still running after `timeout` s (None: wait for the end)."""
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.wait(timeout)
        self.handle.join(timeout)
        return self.handle.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.is_file() else ""


def start_forked(prog: str, args: Sequence[Any], log: Path | None) -> Running:
    args = [str(a) for a in args]
    proc = _forkserver().Process(target=_forked_main, args=(prog, args, str(log) if log else None))
    proc.start()
    return Running(f"{prog} {' '.join(args)}", proc, log)


def start_module(prog: str, args: Sequence[Any], log: Path) -> Running:
    """`python -m PROG ARGS` in a fresh interpreter, as a user types it."""
    args = [str(a) for a in args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", prog, *args], env=env, cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT)
    return Running(f"python -m {prog} {' '.join(args)}", proc, log)


def kill_when(run: Running, event: Callable[[], bool], jitter_s: float) -> bool:
    """SIGKILL `run` `jitter_s` after `event()` first holds. False if it ended before that.
    No deadline: the command ends by itself, however slow the machine."""
    while not event():
        if not run.alive():
            return False
        time.sleep(0.002)
    if jitter_s > 0:
        time.sleep(jitter_s)
    if not run.alive():
        return False
    run.kill()
    return True


# ---- events to kill at ---------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def shards_listed(dump: Path) -> int:
    m = read_json(dump / "manifest.json")
    return len(m["shards"]) if isinstance(m, dict) and isinstance(m.get("shards"), list) else 0


def checkpoints_listed(run: Path) -> list[str]:
    """A run's checkpoint folders from its index, oldest first, without `final`."""
    index = read_json(run / "checkpoints.json")
    if not isinstance(index, list):
        return []
    return [e["folder"] for e in index if e.get("folder") != "final"]


def rng(name: str) -> random.Random:
    """A generator for one test, from the suite's seed and the test's name."""
    return random.Random(f"{SEED}:{name}")


# ---- the console scripts, and an object store that never answers ---------------------------------

def console_script(prog: str) -> list[str] | None:
    """The installed console script `prog` (beside this interpreter, else on PATH), run as a user
    runs it; None where it is not installed."""
    import shutil

    beside = Path(sys.executable).parent / prog
    found = str(beside) if beside.is_file() else shutil.which(prog)
    return [found] if found else None


def command_env(**extra: str) -> dict[str, str]:
    """The environment a console script runs this checkout in (PYTHONPATH before the installed
    package), with dummy AWS keys so that an s3:// location goes straight to its endpoint."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MATS_SAE_DEBUG"):
        env.pop(key, None)
    return env | extra


class SilentStore:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte: an object
    store that hangs. `url` is its endpoint; `connections` counts what it accepted."""

    def __init__(self) -> None:
        import socket
        import threading

        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._held: list = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        return len(self._held)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            self._held.append(conn)

    def close(self) -> None:
        import socket

        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._server.close()
        for conn in self._held:
            conn.close()

    def __enter__(self) -> "SilentStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PausingProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port) that forwards every byte, but
    once `pause_after` bytes have gone upstream holds all traffic, both ways, for `pause_s`
    seconds, then forwards again: an object store that stops answering mid-job and comes back.
    `url` is its endpoint; `paused` says whether the pause has begun."""

    def __init__(self, upstream: tuple[str, int], pause_after: int, pause_s: float) -> None:
        import socket
        import threading

        self.upstream, self.pause_after, self.pause_s = upstream, pause_after, pause_s
        self.sent = 0
        self.pause_until: float | None = None
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def paused(self) -> bool:
        return self.pause_until is not None

    def _hold(self) -> None:
        import time

        while self.pause_until is not None and time.monotonic() < self.pause_until:
            time.sleep(0.05)

    def _pump(self, src, dst, upward: bool) -> None:
        import time

        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upward:
                    with self._lock:
                        self.sent += len(data)
                        if self.pause_until is None and self.sent >= self.pause_after:
                            self.pause_until = time.monotonic() + self.pause_s
                self._hold()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def close(self) -> None:
        self._server.close()
