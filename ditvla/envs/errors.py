"""The envs part's errors (importable without a simulator, for the command line)."""

from ditvla.errors import DitvlaError


class SimulatorUnavailable(DitvlaError, RuntimeError):
    """A simulator's packages are missing or cannot be set up offline."""
