"""The emulated Chameleon ("the testbed"): Keystone, Nova, Neutron, Glance, Blazar and resource discovery over
real HTTP on 127.0.0.1, plus SSH nodes, all over one on-disk world shared by every process.

    from labctl.testbed import Testbed
    with Testbed.start(state_dir, time_scale=0.001, ssh=False) as tb:
        conn = openstack.connect(**tb.os_env("chi@tacc") ...)   # or use tb.auth_url(site), tb.os_env(site)

See `labctl.testbed.server` for the URL layout and `labctl.testbed.world.World` for the control API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labctl.testbed.server import Testbed
    from labctl.testbed.world import World

__all__ = ["Testbed", "World"]


def __getattr__(name: str):
    if name == "Testbed":
        from labctl.testbed.server import Testbed

        return Testbed
    if name == "World":
        from labctl.testbed.world import World

        return World
    raise AttributeError(name)
