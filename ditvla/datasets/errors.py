"""The datasets part's error (importable without zarr, for the command line)."""


class DatasetError(ValueError):
    """A store that is not a valid replay buffer, or input that cannot be written to one."""
