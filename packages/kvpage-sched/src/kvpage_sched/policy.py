"""Waiting-queue orderings and the matching preemption victim order.

fcfs: arrival order. priority: lower `priority` value first, then arrival order (as in vLLM).
A preempted request goes back to the front: first of all under fcfs, first of its priority
class (by its original arrival) under priority.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from .request import Request


class WaitingQueue(Protocol):
    def push(self, request: Request) -> None: ...
    def push_front(self, request: Request) -> None: ...
    def peek(self) -> Request: ...
    def pop(self) -> Request: ...
    def remove(self, request: Request) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Request]: ...


class FCFSQueue:
    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def push(self, request: Request) -> None:
        self._q.append(request)

    def push_front(self, request: Request) -> None:
        self._q.appendleft(request)

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, request: Request) -> None:
        self._q.remove(request)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)


class PriorityQueue:
    """Heap on (priority, arrival_time, seq)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (*_priority_key(request), request))

    push_front = push  # the key already puts an earlier arrival ahead

    def peek(self) -> Request:
        return self._heap[0][-1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def remove(self, request: Request) -> None:
        self._heap = [e for e in self._heap if e[-1] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[-1] for e in sorted(self._heap, key=lambda e: e[:3]))


def _fcfs_key(r: Request) -> tuple:
    return (r.arrival_time, r.seq)


def _priority_key(r: Request) -> tuple:
    return (r.priority, r.arrival_time, r.seq)


def make_waiting_queue(policy: str) -> WaitingQueue:
    return PriorityQueue() if policy == "priority" else FCFSQueue()


def victim_key(policy: str) -> Callable[[Request], tuple]:
    """Sort key whose MAXIMUM is the running request to preempt first."""
    return _priority_key if policy == "priority" else _fcfs_key
