"""The exception hierarchy of dissect.

Every failure caused by user input (a dataset file, a model spec, a layer name, an option, a cache)
raises a subclass of :class:`DissectError` whose message names what was wrong and what was expected.
The command line turns a ``DissectError`` into one message and exit status 2.
"""

from __future__ import annotations


class DissectError(Exception):
    """Base class of every error dissect raises for bad input."""


class DatasetError(DissectError):
    """A dataset file is missing or malformed; the message names the file and row."""


class ModelError(DissectError):
    """A model spec or weights file cannot be used."""


class LayerError(DissectError):
    """A layer name does not exist in the model (the message lists close matches)."""


class CacheError(DissectError):
    """An activation cache or run output is missing, incomplete, or from another configuration."""


class OptionError(DissectError):
    """An option has an invalid value; the message names the option and the allowed values."""
