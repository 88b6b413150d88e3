"""Project error types. Each message says what went wrong and how to fix it."""


class EdgeClusterError(Exception):
    """Base class for errors a user can act on."""


class AuthenticationError(EdgeClusterError):
    """A peer refused our cluster token, or presented a wrong one."""


class ProtocolMismatchError(EdgeClusterError):
    """Peers speak different protocol versions."""


class TensorMessageError(EdgeClusterError, ValueError):
    """A tensor message does not match its declared dtype, shape or size limits."""


COORDINATOR_PEER = "the coordinator (hub)"  # how agents name rank 0 of a session


class PeerLostError(EdgeClusterError):
    """A peer of a session disconnected or stopped answering."""

    def __init__(self, peer: str, detail: str) -> None:
        who = "the coordinator" if peer == COORDINATOR_PEER else f"agent {peer}"
        super().__init__(f"lost {who}: {detail}")
        self.peer = peer


class PlanError(EdgeClusterError, ValueError):
    """No placement of the model fits the cluster."""
