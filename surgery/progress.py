"""One line on stderr for long work: ``surgery: capture ResNet ... 3.1 s``.

:func:`stage` wraps work that can take seconds (capture, the channel analysis, Shrink and its
self-check, export and its verification, k-means). When stderr is a terminal and the work is still
running after :data:`DELAY` seconds, it prints what it is doing, and the time when done; quick work
prints nothing, and nothing is printed when stderr is not a terminal (tests, pipes, notebooks) or
inside :func:`quiet` (the command line's ``--quiet``). Stages nest: only the outermost prints.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

__all__ = ["stage", "staged", "quiet", "DELAY"]

F = TypeVar("F", bound=Callable[..., Any])

DELAY = 2.0  # seconds before a stage says what it is doing
_state = threading.local()


def _enabled() -> bool:
    if getattr(_state, "quiet", 0) or os.environ.get("SURGERY_QUIET"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No stage lines in this block (this thread)."""
    _state.quiet = getattr(_state, "quiet", 0) + 1
    try:
        yield
    finally:
        _state.quiet -= 1


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Say `what` is running if it takes longer than :data:`DELAY` (see the module doc)."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    if depth or not _enabled():
        try:
            yield
        finally:
            _state.depth = depth
        return
    shown = threading.Event()
    lock = threading.Lock()

    def announce() -> None:
        with lock:
            if not done:
                print(f"surgery: {what} ...", end="", file=sys.stderr, flush=True)
                shown.set()
    done = False
    timer = threading.Timer(DELAY, announce)
    timer.daemon = True
    t0 = time.perf_counter()
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            done = True
            if shown.is_set():
                print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        _state.depth = depth


def staged(describe: Callable[..., str]) -> Callable[[F], F]:
    """Decorator: run the function as a :func:`stage` described by ``describe(*args, **kwargs)``."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with stage(describe(*args, **kwargs)):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap
