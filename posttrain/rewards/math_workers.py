"""The math-verify worker processes that decide mathematical equivalence under a time limit.

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread and
cannot interrupt C code (``\\boxed{9^{9^{9}}}`` makes sympy compute a 370-million-digit
integer while holding the GIL), so math-verify runs here with its timeouts disabled
inside worker processes that this module kills when a check exceeds its time limit. The
limit therefore holds in any thread; a check that runs out of time counts as not equal.

A worker runs this file alone, loaded by path (see `_BOOT`), so it never imports
posttrain's torch-heavy ``__init__``: this module must not import any other posttrain
module at module level.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

# Starting a worker imports sympy (about a second, much more on a cold or busy machine);
# this wait is not charged to any check's time limit.
WORKER_STARTUP_TIMEOUT_S = 120.0
# A pathological answer can also eat memory faster than the time limit stops it.
WORKER_MEMORY_LIMIT_BYTES = 4 << 30


def verify_equal(gold: str, prediction: str, timeout_s: float) -> bool:
    """math-verify's verdict on `prediction` against `gold`, in a worker; False on timeout."""
    return _pool().equal(gold, prediction, timeout_s)


# -------------------------------------------------------------------- in the worker


def _worker_main() -> None:
    """Entry point of a worker process: answer one JSON ``[gold, prediction]`` per line.

    Replies ``{"equal": bool}`` per request, after a first ``{"ready": true}`` (or
    ``{"error": ...}`` when math-verify cannot be imported or fails its self-check).
    """
    # Only protocol lines may reach the parent's pipe, whatever the libraries print.
    protocol = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _limit_memory(WORKER_MEMORY_LIMIT_BYTES)
    _exit_with_parent()

    def send(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        import math_verify
    except Exception as e:
        send({"error": " ".join(f"{type(e).__name__}: {e}".split())})
        return
    # Timeouts are disabled on purpose (the parent enforces them), so its warning is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    configs = (math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig())

    def equal(gold: str, prediction: str) -> bool:
        parsed_gold = math_verify.parse(gold, configs, parsing_timeout=None)
        parsed = math_verify.parse(prediction, configs, parsing_timeout=None)
        return bool(parsed_gold and parsed) and bool(
            math_verify.verify(parsed_gold, parsed, timeout_seconds=None)
        )

    # Before 0.8 a disabled timeout made every parse fail quietly, so every answer
    # would score 0: refuse to start instead.
    if not equal("\\boxed{\\frac{1}{2}}", "0.5"):
        send({"error": "math-verify fails its self-check (1/2 != 0.5); need math-verify>=0.8"})
        return
    send({"ready": True})
    for line in sys.stdin:
        try:
            verdict = equal(*json.loads(line))
        except Exception:  # math-verify swallows its own errors; this is the rest
            verdict = False
        send({"equal": verdict})


def _limit_memory(limit: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # no such limit here: run without one
        pass


def _exit_with_parent() -> None:
    """Exit when the parent dies, so a killed run leaves no worker behind (when the
    worker is in Python code; a C loop ends on its own and then sees stdin close)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="posttrain-parent-watch").start()


# -------------------------------------------------------------------- in the parent

# The worker loads this file by path, not `posttrain.rewards.math_workers`, so it never
# imports the package's torch-heavy __init__; it inherits the parent's sys.path to find
# math-verify.
_BOOT = (
    "import importlib.util, json, sys\n"
    "sys.path[:] = json.loads(sys.argv[2])\n"
    "spec = importlib.util.spec_from_file_location('_posttrain_reward_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module._worker_main()\n"
)


class _Worker:
    """One math-verify process answering one check at a time over its pipes."""

    def __init__(self) -> None:
        self.alive = True
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.path.abspath(__file__), json.dumps(sys.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="ascii",
            bufsize=1,
        )
        # A reader thread turns the pipe into a queue, whose get() has a timeout that
        # works in any thread and on any platform (select() does not on Windows pipes).
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True, name="posttrain-math-verify").start()
        reply = self._reply(WORKER_STARTUP_TIMEOUT_S)
        if not reply or not reply.get("ready"):
            self.kill()
            why = (reply or {}).get("error", "it exited or did not answer")
            raise RuntimeError(f"the math-verify worker process did not start: {why}")

    def _read(self) -> None:
        # Only this thread touches stdout (closing it from another thread while a read
        # blocks is unsafe); a killed process ends the read with EOF.
        try:
            with self.process.stdout:
                for line in self.process.stdout:
                    self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(None)

    def _reply(self, timeout_s: float) -> dict[str, Any] | None:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return None if line is None else json.loads(line)

    def check(self, gold: str, prediction: str, timeout_s: float) -> bool | None:
        """The verdict; False on timeout or a crash; None if the worker was already dead."""
        try:
            self.process.stdin.write(json.dumps([gold, prediction]) + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError):
            self.kill()
            return None
        reply = self._reply(timeout_s)
        if reply is None:
            crashed = self.process.poll() is not None
            logger.warning(
                "math-verify check %s; counted as not equal (prediction starts %r)",
                "crashed its worker" if crashed else f"exceeded {timeout_s:.3g}s",
                prediction[:60],
            )
            self.kill()
            return False
        return bool(reply.get("equal"))

    def kill(self) -> None:
        self.alive = False
        try:
            self.process.kill()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(OSError):  # flushing an unread request hits a dead pipe
            self.process.stdin.close()


class _VerifierPool:
    """Up to `max_workers` worker processes, started on demand, shared by all threads."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._idle: list[_Worker] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    def equal(self, gold: str, prediction: str, timeout_s: float) -> bool:
        # A second try only when the worker had died before it got the check (killed
        # from outside while idle); a check that crashed its worker is not repeated.
        for _attempt in range(2):
            worker = self._acquire()
            try:
                verdict = worker.check(gold, prediction, timeout_s)
            finally:
                self._release(worker)
            if verdict is not None:
                return verdict
        return False

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                while not self._idle and self._count >= self.max_workers:
                    self._cond.wait()
                if not self._idle:
                    break
                worker = self._idle.pop()
                if worker.process.poll() is None:
                    return worker
                worker.kill()  # died while idle (killed from outside): reap, replace
                self._count -= 1
            self._count += 1
        try:
            return _Worker()  # outside the lock: other threads keep using idle workers
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if worker.alive and self._closed:
                worker.kill()
            if worker.alive:
                self._idle.append(worker)
            else:
                self._count -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.kill()


_POOL: _VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _VerifierPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _VerifierPool(max_workers=min(4, os.cpu_count() or 1))
        return _POOL


def close_math_workers() -> None:
    """Stop the math-verify worker processes (the next check starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.close()


def _forget_pool_after_fork() -> None:
    # A forked child (a DataLoader worker) must not use or kill its parent's workers:
    # their reader threads did not survive the fork, and they are not its children.
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


atexit.register(close_math_workers)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)
