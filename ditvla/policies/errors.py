"""Errors a policy raises on bad input or a bad checkpoint (importable without torch)."""


class PolicyInputError(ValueError):
    """An observation or batch that does not match what the policy was built for."""


class CheckpointError(RuntimeError):
    """A policy folder that is incomplete, damaged or from another ditvla version."""
