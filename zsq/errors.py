"""User-facing errors (ZsqError: the CLI prints one line and exits with code 2) and zsq's own bugs
(InternalError: exit code 3 and a request to report it)."""


class ZsqError(Exception):
    """A problem with the user's input (model name, weights, data, bits, paths).

    Raised instead of letting a deep traceback escape; the message must say what
    was wrong and, where possible, what would be right.
    """


class InternalError(Exception):
    """An invariant of zsq itself broke: a bug in zsq, not a problem with the user's input. Raised instead
    of ZsqError so the CLI does not tell the user to fix an input that was fine."""


def require(module: str, extra: str):
    """Import an optional dependency, or a one-line ZsqError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ZsqError(f"this needs the optional package {module.split('.')[0]!r}: pip install 'zsq[{extra}]' "
                       "(or 'zsq[all]' for every optional feature)") from None
