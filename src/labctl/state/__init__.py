"""State store: where labctl records what it created, before and after each cloud call."""

from labctl.state.store import CLASS_SHARED, DeploymentRecord, DeploymentView, ResourceRecord, StateStore

__all__ = ["CLASS_SHARED", "DeploymentRecord", "DeploymentView", "ResourceRecord", "StateStore"]
