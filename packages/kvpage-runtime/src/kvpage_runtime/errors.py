"""Typed exceptions raised by kvpage-runtime."""


class KVPageError(Exception):
    """Base class of every error kvpage-runtime raises on purpose."""


class ModelLoadError(KVPageError):
    """A model could not be loaded: missing or unreadable files, unsafe formats, bad metadata."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint names an architecture (or feature) that kvpage does not implement."""


class InvalidRequestError(KVPageError, ValueError):
    """A request cannot be served as asked: bad sampling parameters, empty prompt, prompt too long."""


class EngineConfigError(KVPageError, ValueError):
    """The engine cannot start with this configuration (e.g. the KV cache cannot hold one request)."""
