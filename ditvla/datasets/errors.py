"""The datasets part's error (importable without zarr, for the command line)."""

from ditvla.errors import DitvlaError


class DatasetError(DitvlaError, ValueError):
    """A store that is not a valid replay buffer, or input that cannot be written to one."""
