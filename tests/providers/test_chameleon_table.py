"""The Chameleon adapter dispatches every plan kind through its one handler table."""

from __future__ import annotations

import pytest

from labctl.errors import CloudError
from labctl.plan import KIND_ORDER
from labctl.providers.chameleon import ChameleonProvider
from labctl.providers.chameleon.session import TABLE
from labctl.sites import resolve


def test_every_plan_kind_has_a_handler_and_the_waited_kinds_a_status():
    assert sorted(TABLE.kinds()) == sorted(KIND_ORDER)
    handlers = ChameleonProvider(resolve("kvm@tacc"), None).handlers
    assert sorted(k for k, h in handlers.items() if h.waits) == ["reservation", "server", "volume",
                                                                  "volume_attachment"]
    with pytest.raises(CloudError, match="no handler for 'disk'"):
        handlers["disk"]
