"""The one base class of errors a user can fix: lac prints them as one line (`lac: ...`, exit 2)."""


class LacError(ValueError):
    """Bad input or a broken environment, with a message that names the value and the fix."""
