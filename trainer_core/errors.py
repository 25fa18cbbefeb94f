"""One exception type for problems the user can fix; its message says what and where."""


class KilnError(ValueError):
    """Bad input or configuration: the message names the file / option / step and what to do."""
