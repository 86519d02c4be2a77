"""Neuron's exceptions, split by what the caller must do with them.

    NeuronError
    ├── SetupError              the run cannot start; nothing was processed. Exit code 4.
    │   ├── ConfigError         a setting is invalid (names the setting and the allowed values)
    │   ├── WeightsError        model weights missing, unverifiable or not matching their sha256
    │   ├── ModelUnavailable    a route has no trained checkpoint: its instances are skipped, the run goes on
    │   └── RuntimeRefused      the network exported for ONNX Runtime does not compute what torch computes
    ├── RetryableError          transient: database or broker unreachable, CUDA out of memory; try again
    │   ├── TransientReadError  the storage failed to deliver a file's bytes (EIO, stale NFS handle, timeout, out of
    │   │                       memory): the file itself may be fine, so the instance is retried, never failed
    │   ├── BrokerUnavailable   the producer could not reach the broker within its wait; instances stay pending
    │   └── PeerUnavailable     a DICOM peer (PACS, router) could not be reached, refused the association or the
    │                           request, or answered with a failure: the pull or delivery is retried with backoff
    ├── OutputUnwritable        the results database refuses writes (read-only, full): the run stops, what was
    │                           committed stays, and the same command finishes the rest once it is fixed. Exit code 4.
    └── InputError              permanent and per instance: recorded on the instance, never retried
        ├── SkippedInput        valid input that Neuron does not screen (modality, body part, not DICOM)
        └── FailedInput         input that should have been screenable but is broken
            ├── DecodeError     pixel data unreadable: truncated, undecodable transfer syntax, no pixels
            ├── ImageTooLarge   header claims more pixels than the configured limit
            └── RejectedImage   the pixels contradict the header (e.g. a "grayscale" image in colour)

Every message names the bad value, the rule and the fix. Third-party exceptions are translated at the boundary with
``raise Ours(...) from exc``. All classes keep their message as the only constructor argument so they pickle
(Celery sends them between processes).
"""

from __future__ import annotations

from neuron.work import Status


class NeuronError(Exception):
    """Base of every error Neuron raises on purpose."""


class SetupError(NeuronError):
    """The run cannot start."""


class ConfigError(SetupError):
    """A setting has a value Neuron cannot use."""


class WeightsError(SetupError):
    """Model weights are missing, unverified or corrupt."""


class ModelUnavailable(SetupError):
    """A route's model has no checkpoint; the run goes on and that route's instances are skipped with this reason."""


class RuntimeRefused(SetupError):
    """The graph exported for another runtime differs from the torch module beyond the parity bound."""


class RetryableError(NeuronError):
    """A transient failure: the same work may succeed later."""


class TransientReadError(RetryableError):
    """Reading an input file failed in a way that says nothing about the file (I/O error, network storage gone,
    out of memory); the same read may succeed later."""


class BrokerUnavailable(RetryableError):
    """The broker could not be reached within the producer's wait; nothing was sent, the instances stay pending."""


class PeerUnavailable(RetryableError):
    """A DICOM peer could not be reached or refused what was asked (association, C-FIND, C-GET, C-MOVE, C-STORE)."""


class OutputUnwritable(NeuronError):
    """The results database refuses writes (read-only file or folder, full disk); the run cannot go on."""


class InputError(NeuronError):
    """A permanent, per-instance problem with the input; recorded with ``status`` and never retried."""

    status: Status = Status.FAILED

    @property
    def reason(self) -> str:
        return str(self)


class SkippedInput(InputError):
    status = Status.SKIPPED


class FailedInput(InputError):
    status = Status.FAILED


class DecodeError(FailedInput):
    pass


class ImageTooLarge(FailedInput):
    pass


class RejectedImage(FailedInput):
    pass
