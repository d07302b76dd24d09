"""Round-robin scheduling of CPU work across in-flight requests.

A request's work is split into tasks (its micro-batches of rows to score, its images to
decode) queued in the request's own :class:`Lane`. The scheduler keeps at most ``slots``
tasks running on its thread pool. When a slot frees, the next task comes from the lane
with the fewest tasks running, and among those from the one served longest ago (a lane
never served first). A plain ThreadPoolExecutor serves first come first served, so a small
request that arrives behind a 4,096-item batch waits for all of it; here it waits for
one of the tasks already running to finish.

Everything but the tasks themselves runs on the event loop, so no locks are needed. When a
request ends (done, failed, cancelled, past its deadline) its queued tasks are dropped.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

_Result = TypeVar("_Result")


@dataclass(eq=False)
class _Task:
    call: Callable[[], Any]
    future: asyncio.Future[Any]


@dataclass(eq=False)
class Lane:
    """One request's queue of tasks; get one from :meth:`FairScheduler.lane`."""

    tasks: deque[_Task] = field(default_factory=deque)
    running: int = 0
    served_at: int = -1  # the scheduler's dispatch count at this lane's latest task


class FairScheduler:
    def __init__(self, executor: Executor, slots: int) -> None:
        self._executor = executor
        self._slots = slots
        self._running = 0
        self._waiting: list[Lane] = []  # lanes with queued tasks, in order of arrival
        self._dispatched = itertools.count()

    @contextmanager
    def lane(self) -> Iterator[Lane]:
        """A lane for one request's tasks; its queued tasks are dropped when the block ends."""
        lane = Lane()
        try:
            yield lane
        finally:
            for task in lane.tasks:
                task.future.cancel()
            if lane.tasks:
                lane.tasks.clear()
                self._waiting.remove(lane)

    async def run(self, lane: Lane, function: Callable[..., _Result], *args: Any) -> _Result:
        """``function(*args)`` on the pool when the lane's turn comes."""
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        if not lane.tasks:
            self._waiting.append(lane)
        lane.tasks.append(_Task(functools.partial(function, *args), future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running < self._slots and self._waiting:
            # min() keeps the first of equals: the earliest arrival among new lanes.
            lane = min(self._waiting, key=lambda waiting: (waiting.running, waiting.served_at))
            task = lane.tasks.popleft()
            if not lane.tasks:
                self._waiting.remove(lane)
            if task.future.done():  # its caller gave up
                continue
            self._running += 1
            lane.running += 1
            lane.served_at = next(self._dispatched)
            running = loop.run_in_executor(self._executor, task.call)
            running.add_done_callback(functools.partial(self._finished, lane, task))

    def _finished(self, lane: Lane, task: _Task, running: asyncio.Future[Any]) -> None:
        self._running -= 1
        lane.running -= 1
        if not task.future.done():
            if running.cancelled():
                task.future.cancel()
            elif (error := running.exception()) is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(running.result())
        elif not running.cancelled():
            running.exception()  # retrieved: the caller is gone, nobody else will
        self._dispatch()
