"""The one exception type users see: the CLIs print its message on one line and exit non-zero."""


class OspEvalError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""
