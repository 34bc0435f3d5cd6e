"""The base of every error ditvla raises for input it cannot use.

A :class:`DitvlaError` is the user's to fix — a damaged store, a missing key, an unknown
task, a setting out of range, a policy folder of another format — and the command line
prints it as one line with exit status 2. Anything else is a bug in ditvla and shows its
traceback. Each part has its own subclasses (``datasets/errors.py``, ``envs/errors.py``,
``deploy/errors.py``, the policy errors in ``contract.py``), importable without the part's
heavy dependencies.
"""


class DitvlaError(Exception):
    """Input ditvla cannot use, with what was wrong, what was expected and where."""


class ConfigError(DitvlaError, ValueError):
    """A setting or argument out of range, of an unknown name, or at odds with another."""
