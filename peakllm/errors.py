"""The one exception type a user sees: the CLI prints its message on one line and exits non-zero."""


class PeakError(Exception):
    """Bad input or an unusable environment, with a message meant for the user."""
