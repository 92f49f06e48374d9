"""The client-side rate limit applies to every HTTP request the Chameleon adapter sends, on the real SDK session."""

from __future__ import annotations

import time

from labctl import sites
from labctl.credentials import find_openstack_credentials
from labctl.providers.chameleon import ChameleonProvider


def test_every_request_waits_for_the_rate_limit(tmp_path):
    from labctl.testbed import Testbed

    tb = Testbed.start(state_dir=tmp_path / "tb", time_scale=0.001, ssh=False)
    try:
        site = sites.emulate(sites.resolve("kvm@tacc"))
        site = site.__class__(**{**site.__dict__, "auth_url": tb.auth_url("kvm@tacc")})
        provider = ChameleonProvider(site, find_openstack_credentials(site, env=tb.os_env("kvm@tacc")))
        provider.set_rate_limit(40)
        provider.conn.authorize()
        before = len(tb.world.request_log())
        start = time.monotonic()
        for _ in range(30):
            list(provider.conn.compute.flavors())  # one HTTP request each, outside the adapter's own calls
        elapsed = time.monotonic() - start
        sent = len(tb.world.request_log()) - before
        assert sent >= 30
        # A bucket of 5 then 40/s: at least (sent - 5) / 40 seconds, whatever the SDK does per call.
        assert elapsed >= (sent - 5) / 40 * 0.95
    finally:
        tb.stop()
