"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class ZsqError(Exception):
    """A problem with the user's input (model name, weights, data, bits, paths).

    Raised instead of letting a deep traceback escape; the message must say what
    was wrong and, where possible, what would be right.
    """
