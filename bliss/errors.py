"""The exceptions the library raises on purpose.

Every message says what was wrong and what to do about it; the command line prints it as
one line, and the server maps each class to a gRPC status code.
"""


class BlissError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InvalidInputError(BlissError):
    """The caller's input (files, arrays, options) is malformed or inconsistent."""


class NotFoundError(BlissError):
    """A named thing (index version, file, class) does not exist."""


class WeightsUnavailableError(BlissError):
    """Model weights are neither cached locally nor downloadable from here."""


class StoreError(BlissError):
    """The statistics store is unreachable, not migrated, or inconsistent."""
