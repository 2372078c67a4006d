"""Typed exceptions raised by kvpage-kernels."""


class KernelError(Exception):
    """Base class of every kvpage-kernels error."""


class KernelBackendUnavailable(KernelError, RuntimeError):
    """The requested backend cannot run here; the message names what is missing."""


class KernelInputError(KernelError, ValueError):
    """An argument has the wrong shape, dtype, device or layout; the message names it."""
