"""The client-side rate limit applies to every HTTP request the Chameleon adapter sends, on the real SDK session."""

from __future__ import annotations

import time

from tests.fixtures.chameleon import emulated_kvm


def test_every_request_waits_for_the_rate_limit(tmp_path):
    with emulated_kvm(tmp_path, poll_interval=None) as (tb, provider):
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
