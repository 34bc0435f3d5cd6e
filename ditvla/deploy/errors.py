"""The deploy part's errors (importable without ZeroMQ, for the command line)."""

from ditvla.errors import DitvlaError


class TransportError(DitvlaError, RuntimeError):
    """A channel that cannot be opened as asked (address, key)."""


class ServerUnavailable(TransportError):
    """No policy server answered the controller's handshake."""


class RobotUnavailable(DitvlaError, RuntimeError):
    """The robot asked for cannot be driven here (its package is not installed)."""
