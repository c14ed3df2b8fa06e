"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class ZsqError(Exception):
    """A problem with the user's input (model name, weights, data, bits, paths).

    Raised instead of letting a deep traceback escape; the message must say what
    was wrong and, where possible, what would be right.
    """


def require(module: str, extra: str):
    """Import an optional dependency, or a one-line ZsqError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ZsqError(f"this needs the optional package {module.split('.')[0]!r}: pip install 'zsq[{extra}]' "
                       "(or 'zsq[all]' for every optional feature)") from None
