"""Every error the library raises on purpose, under one base: :class:`DistilledSSLError`.

A ``DistilledSSLError`` is something the user can fix (a config value, missing data, a stale or
corrupt artifact, the Hub, the device); the CLI turns each into a one-line message
(:mod:`distilled_ssl.cli._errors`). Anything else is a bug and keeps its traceback. Each class
also derives from the builtin it replaced, so ``except ValueError`` and the like keep working.
"""

from __future__ import annotations


class DistilledSSLError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(DistilledSSLError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class UnknownNameError(ConfigError):
    """A name that a registry (models, sources, baselines, ...) does not know."""


class UnknownArchError(UnknownNameError):
    """An architecture name that the model registry does not know."""


class DataError(DistilledSSLError, RuntimeError):
    """Source or downstream data is unreadable, corrupt or of the wrong shape."""


class DataNotFoundError(DataError):
    """The requested source data is not on disk (the message says how to get it)."""


class DataFormatError(DataError, ValueError):
    """Image data has the wrong dtype, shape or layout."""


class ArtifactError(DistilledSSLError, RuntimeError):
    """An artifact is missing, corrupt, foreign or was made with a different configuration."""


class CheckpointRefusedError(ArtifactError):
    """A ``.pth`` / ``.ckpt`` checkpoint pickles Python objects: only ``torch.load(weights_only=True)``
    is used, because unpickling anything else runs code from the file."""


class SetFormatError(ArtifactError):
    """A set folder (or a file in it) is missing, truncated, inconsistent or of another format."""


class NotASetError(SetFormatError):
    """The folder is not a distilled_ssl set at all (a foreign folder or a wrong path)."""


class ChecksumError(SetFormatError):
    """A file's sha256 or size differs from the folder's manifest: truncated or tampered with."""


class OutputExistsError(DistilledSSLError, FileExistsError):
    """An output folder exists and is not empty (pass ``overwrite``/``--force`` to replace it)."""


class StorageError(DistilledSSLError, OSError):
    """A file or folder cannot be created or written: no space left, read-only or not permitted,
    a name too long, or a file where a folder should be."""


class HubError(DistilledSSLError, RuntimeError):
    """A Hub operation failed; the message says why and what to do."""


class UnknownSetNameError(HubError):
    """A short name that is not a known set (and not an ``org/name`` repo id)."""


class SetNotFoundError(HubError):
    """The dataset repo does not exist (or is private and the token cannot see it)."""


class SetRevisionNotFoundError(HubError):
    """The repo exists but the requested tag, branch or commit does not."""


class MissingTokenError(HubError):
    """Pushing needs a Hugging Face token (``HF_TOKEN`` or ``hf auth login``), or it was rejected."""


class HubUnreachableError(HubError):
    """The Hub cannot be reached (no network or offline mode) and the set is not in the cache."""


class DeviceError(DistilledSSLError, RuntimeError):
    """The requested device is not available on this machine."""


class DivergenceError(DistilledSSLError, FloatingPointError):
    """Training produced non-finite values (loss, gradients or weights): lower a learning rate."""


class KrrSolveError(DivergenceError):
    """The kernel ridge regression system could not be solved in float32."""
