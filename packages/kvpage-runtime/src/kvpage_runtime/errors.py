"""Typed exceptions raised by kvpage-runtime."""


class KVPageError(Exception):
    """Base class of every error kvpage-runtime raises on purpose."""


class ModelLoadError(KVPageError):
    """A model could not be loaded: missing or unreadable files, unsafe formats, bad metadata."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint names an architecture (or feature) that kvpage does not implement."""
