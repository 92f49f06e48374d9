"""Nova v2.1 (microversions 2.1-2.96): servers, actions, metadata, tags, flavors, keypairs, limits.

The service's face for the server (`router`, `error_body`, `PREFIX`, `root`); the handlers are in `common`
(versions, microversions), `servers`, `flavors` (flavors, keypairs, limits, quotas, zones, extensions) and
`attachments` (volume attachments), each registering its routes on the one `router`.
"""

from labctl.testbed.openstack.nova import attachments, flavors, servers
from labctl.testbed.openstack.nova.common import (
           MAX_VERSION,
           MIN_VERSION,
           PREFIX,
           error_body,
           microversion,
           root,
           router,
)

__all__ = ["MAX_VERSION", "MIN_VERSION", "PREFIX", "attachments", "error_body", "flavors", "microversion", "root",
           "router", "servers"]
