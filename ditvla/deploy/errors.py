"""The deploy part's errors (importable without ZeroMQ, for the command line)."""


class TransportError(RuntimeError):
    """A channel that cannot be opened as asked (address, key)."""


class ServerUnavailable(TransportError):
    """No policy server answered the controller's handshake."""


class RobotUnavailable(RuntimeError):
    """The robot asked for cannot be driven here (its package is not installed)."""
