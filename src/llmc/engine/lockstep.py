"""Running the chunks of calibration windows through one block in lockstep (greenlets), and
the exception that ends a chunk's forward early (the replay passes and the capture)."""

from __future__ import annotations

from collections.abc import Callable

import greenlet


class Reached(Exception):
    """Raised inside a forward to stop it once what was needed has been seen."""


class Lockstep:
    """Runs ``work(i)`` for ``n`` chunks as greenlets in this thread, in lockstep: a chunk that
    reaches :meth:`barrier` pauses; when every chunk has paused there, the barrier's action runs
    once and the chunks resume in order. Greenlets, not threads: every torch op stays on the
    calling thread and its OpenMP pool (worker threads made each op about 2x slower here), and
    an exception, KeyboardInterrupt included, surfaces in the caller. Thread-local torch state
    (grad mode, autocast) is shared by the chunks: a context entered inside a block's forward
    around a barrier would leak to the other chunks; the supported blocks enter none.

    Every paused chunk keeps its call stack, and with it every intermediate tensor of its
    forward, alive until the barrier releases it: the plan chooses a replay pass per group
    instead where that does not fit."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._action: Callable[[], None] | None = None

    def barrier(self, action: Callable[[], None]) -> None:
        self._action = action
        greenlet.getcurrent().parent.switch()

    def current(self) -> greenlet.greenlet:
        return greenlet.getcurrent()

    def run(self, work: Callable[[int], None]) -> None:
        chunks = [greenlet.greenlet(lambda i=i: work(i)) for i in range(self.n)]
        try:
            while chunks:
                self._action = None
                for g in chunks:
                    g.switch()
                alive = [g for g in chunks if not g.dead]
                if self._action is not None:
                    if len(alive) != len(chunks):
                        raise RuntimeError("chunks disagree on the barriers of a block forward")
                    self._action()
                chunks = alive
        finally:
            for g in chunks:
                if not g.dead:
                    g.throw(greenlet.GreenletExit)
