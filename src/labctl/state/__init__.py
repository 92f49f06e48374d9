"""State store: where labctl records what it created, before and after each cloud call."""

from labctl.state.store import DeploymentRecord, DeploymentView, ResourceRecord, StateStore

__all__ = ["DeploymentRecord", "DeploymentView", "ResourceRecord", "StateStore"]
