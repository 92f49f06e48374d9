"""Neutron v2.0: networks, subnets, routers, ports, floating IPs, security groups and rules, tags, quotas.

The service's face for the server (`router`, `error_body`, `PREFIX`); the handlers are in `common` (versions,
extensions, listings), `nets` (networks, subnets, routers), `ports` (ports, floating IPs), `secgroups` and `tags`
(tags, quotas), each registering its routes on the one `router`.
"""

from labctl.testbed.openstack.neutron import nets, ports, secgroups, tags
from labctl.testbed.openstack.neutron.common import ADMIN_PROJECT, PREFIX, error_body, router

__all__ = ["ADMIN_PROJECT", "PREFIX", "error_body", "nets", "ports", "router", "secgroups", "tags"]
