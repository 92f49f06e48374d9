"""Property test: any price file (random JSON shapes, NaN/Infinity, bytes) gives a table or one `UserError`."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from labctl import pricing  # noqa: E402
from labctl.errors import UserError  # noqa: E402

FUZZ = settings(max_examples=2 * settings.default.max_examples, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
price_tables = st.fixed_dictionaries(
    {"as_of": json_values | st.just("2026-01-01"), "source": json_values | st.just("s"),
     "currency": st.just("USD") | json_values},
    optional={"aws": st.dictionaries(st.text(max_size=8), st.dictionaries(st.text(max_size=8), json_values)
                                     | json_values, max_size=3) | json_values,
              "gcp": json_values, "chameleon": st.fixed_dictionaries(
                  {}, optional={"su_factors": st.dictionaries(st.text(max_size=5), json_values) | json_values,
                                "su_per_host_hour": json_values, "source": json_values}) | json_values,
              "caveats": st.dictionaries(st.text(max_size=5), json_values) | json_values},
)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="labctl-prices-fuzz-") as tmp:
        yield Path(tmp)


@FUZZ
@given(data=price_tables | json_values, raw=st.none() | st.binary(max_size=200))
def test_price_files_load_or_give_one_user_error(workdir: Path, data: object, raw: bytes | None) -> None:
    path = workdir / "prices.json"
    path.write_bytes(raw if raw is not None else json.dumps(data).encode())
    try:
        table = pricing.load_prices(path)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    for provider in ("aws", "gcp"):
        for types in table.get(provider, {}).values():
            assert all(math.isfinite(p) and p >= 0 for p in types.values())
