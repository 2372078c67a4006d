"""Typed errors raised by the scheduler."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class of every error kvpage-sched raises."""


class SchedulerConfigError(SchedulerError, ValueError):
    """A SchedulerConfig field is out of range."""


class RequestRejectedError(SchedulerError, ValueError):
    """A request can never be served under the current limits; the message names the limit."""


class RequestNotFoundError(SchedulerError, KeyError):
    """No live request has this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
