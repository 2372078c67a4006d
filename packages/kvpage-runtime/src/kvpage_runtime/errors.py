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


class EngineDeadError(KVPageError):
    """The engine loop stopped on an error (or was shut down); no request can be served."""


class EngineOverloadedError(KVPageError):
    """Too many requests are waiting; this one was refused and may be retried later."""


class RequestFailedError(KVPageError):
    """Serving this request failed (a fault in its own processing, or in the engine step it was
    part of); the engine goes on serving the others."""


class LoRAAdapterError(InvalidRequestError):
    """A LoRA adapter cannot be served: a missing or malformed PEFT folder, or a feature or
    size this engine does not support (named in the message)."""
