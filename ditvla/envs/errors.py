"""The envs part's errors (importable without a simulator, for the command line)."""


class SimulatorUnavailable(RuntimeError):
    """A simulator's packages are missing or cannot be set up offline."""
