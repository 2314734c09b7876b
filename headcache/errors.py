"""Every exception headcache raises on purpose, in one place.

`HeadcacheError` is the root: the CLI catches it once, prints its message and
exits non-zero (a traceback only with `--debug`). Each message names the file
or field at fault and the fix. Like h5py, a cache problem also subclasses the
matching built-in, so callers can catch `KeyError` or `ValueError` as well.
"""
from __future__ import annotations


class HeadcacheError(Exception):
    """A problem with the user's input that a message can explain."""


class ConfigError(HeadcacheError, ValueError):
    """A setting is outside its allowed values."""


class SpecError(HeadcacheError):
    """A `--spec` cannot be resolved, or the spec breaks its contract."""


class DataError(HeadcacheError):
    """The spec's data is unusable (missing label, empty sequence, ...)."""


class CheckpointError(HeadcacheError):
    """A checkpoint is missing, unreadable, or does not fit the backbone."""


class OutputExistsError(HeadcacheError, FileExistsError):
    """An output path exists and `overwrite` was not given."""


class OutputWriteError(HeadcacheError, OSError):
    """An output file or directory could not be written (a full disk, a file size limit, a path through a file)."""


class NonFiniteError(HeadcacheError, ValueError):
    """The backbone produced NaN or Inf for a sequence."""


class CacheError(HeadcacheError):
    """The cache file cannot be used as asked."""


class DiskFullError(CacheError):
    """No room (disk space or the file size limit) for the next block; refused before HDF5 writes any of it."""


class SchemaError(CacheError, ValueError):
    """The file is not a headcache cache of a schema this version reads."""


class FingerprintMismatchError(CacheError, ValueError):
    """The cache was written by a different backbone (or data) than expected."""


class SplitMissingError(CacheError, KeyError):
    """The cache has no such split."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class SplitIncompleteError(CacheError):
    """The split's extraction has not finished."""


class EquivalenceError(HeadcacheError):
    """Cached and end-to-end training gave different heads (`headcache bench`'s check)."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT (or SIGTERM, as the CLI turns it) stopped a run; the message says what was kept and how to go on.

    A KeyboardInterrupt still, so code that stops on Ctrl-C keeps stopping; not a HeadcacheError, because
    nothing was wrong with the input.
    """
