"""Exception types of the tool and the CLI exit code each one maps to.

Every error a user can cause by their input is one of these; the CLI prints
``error: <message>`` on one line and exits with :attr:`CsqcfsError.exit_code`.
"""

from __future__ import annotations


class CsqcfsError(Exception):
    """Base class of every error the tool reports to a user."""

    exit_code: int = 1


class InputFileError(CsqcfsError):
    """A file is missing, unreadable, truncated or of the wrong kind."""

    exit_code = 2


class GraphError(CsqcfsError):
    """A network or graph the tool cannot capture, fold or run."""

    exit_code = 3


class TargetError(GraphError):
    """This target (a back end, a file format, a profile) cannot express this graph.

    Raised with the node, the kind and the target named, e.g. "projection p3: kind
    conv is not supported by netx".
    """


class FoldMismatch(GraphError):
    """The folded float graph does not reproduce the user's model on the calibration inputs.

    Raised by :func:`csqcfs_deploy.convert.check.check_fold` naming the first diverging
    layer; ``check`` holds the :class:`~csqcfs_deploy.convert.check.FoldCheck`.
    """

    check: object = None


class InputDataError(GraphError):
    """Input data handed to a runner is not what the graph takes (shape, dtype, range)."""


class QuantizationError(CsqcfsError):
    """A value does not fit the chosen hardware profile."""

    exit_code = 4


class BackendUnavailable(CsqcfsError):
    """A back end (Lava, Norse, CUDA) is not installed or cannot start."""

    exit_code = 5


class VerificationFailed(CsqcfsError):
    """Two back ends disagree on a spike."""

    exit_code = 6


class DatasetError(CsqcfsError):
    """A dataset is missing or malformed."""

    exit_code = 7


class UnknownDataset(DatasetError):
    """A dataset name that no loader knows (as opposed to a known one with no local
    copy): never replaced by random calibration inputs."""


class FidelityGateFailed(CsqcfsError):
    """The deployed network does not agree with the float IF graph (``--min-agreement``)
    or with the user's model (``--min-source-agreement``) as often as asked."""

    exit_code = 9


class WorkerFailed(CsqcfsError):
    """A worker of a sharded run (``--workers``, ``--ray``) died or failed; the message
    names its shard (samples a..b)."""

    exit_code = 10


class UsageError(CsqcfsError):
    """Command-line arguments that contradict each other or are out of range."""

    exit_code = 8
