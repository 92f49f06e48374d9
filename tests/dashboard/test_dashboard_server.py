"""The dashboard's server and JSON endpoint over a real state store (SQLite and PostgreSQL), over real HTTP on
127.0.0.1: the token gate, the Host check, the headers, and what the JSON says about a class."""

from __future__ import annotations

import http.client
import json
from html.parser import HTMLParser
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.dashboard.conftest import COURSE, HOSTILE_ERROR, HOSTILE_ID, LAB, add_student


def get(served: Any, path: str, method: str = "GET", host: str | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    headers = {"Host": host} if host else {}
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    conn.close()
    return response


def status_json(served: Any) -> dict[str, Any]:
    response = get(served, f"/{served.board.token}/api/status")
    assert response.status == 200, response.body  # type: ignore[attr-defined]
    assert response.getheader("Content-Type") == "application/json"
    return json.loads(response.body)  # type: ignore[attr-defined]


# -- the gate -----------------------------------------------------------------------------------------
def test_binds_loopback_only_with_a_long_random_token(served: Any) -> None:
    from labctl.dashboard import Dashboard

    assert served.server.server_address[0] == "127.0.0.1"
    token = served.board.token
    assert len(token) >= 40 and served.url == f"http://127.0.0.1:{served.port}/{token}/"
    others = {Dashboard(None, LAB, COURSE, served.board.prices).token for _ in range(20)}
    assert len(others) == 20 and token not in others


def test_requests_without_the_token_get_404_and_learn_nothing(served: Any) -> None:
    token = served.board.token
    for path in ("/", "/api/status", f"/{token[:-1]}/", f"/{token}x/api/status", f"/x{token}/",
                 f"/{token.upper() if token.upper() != token else token.lower()}/api/status", "/favicon.ico",
                 f"/api/status/{token}", f"/static/{token}/api/status"):
        response = get(served, path)
        assert response.status == 404, path
        assert token.encode() not in response.body  # type: ignore[attr-defined]
        assert b"student" not in response.body  # type: ignore[attr-defined]


def test_token_pages_other_methods_and_hosts(served: Any, ctx: Any) -> None:
    add_student(ctx.store, "alice", "sim", "up")
    token = served.board.token
    assert get(served, f"/{token}/nothing-here").status == 404
    assert get(served, f"/{token}/api/status", method="POST").status == 405
    redirect = get(served, f"/{token}")
    assert redirect.status == 308 and redirect.getheader("Location") == f"/{token}/"
    # A name rebound to 127.0.0.1 by another web page: refused even with the token.
    assert get(served, f"/{token}/api/status", host=f"evil.example:{served.port}").status == 403
    assert get(served, f"/{token}/api/status", host=f"localhost:{served.port}").status == 200
    page = get(served, f"/{token}/")
    assert page.status == 200 and page.getheader("Content-Type").startswith("text/html")
    csp = page.getheader("Content-Security-Policy")
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    for response in (page, get(served, f"/{token}/api/status"), get(served, "/")):
        assert response.getheader("Cache-Control") == "no-store"
        assert response.getheader("Referrer-Policy") == "no-referrer"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert b"://" not in page.body  # type: ignore[attr-defined]  # nothing from elsewhere (no CDN): loopback only


# -- what the JSON says -------------------------------------------------------------------------------
def test_status_reports_states_failures_sites_leases_and_cost(served: Any, ctx: Any) -> None:
    from labctl.pricing import load_prices

    store = ctx.store
    add_student(store, "alice", "aws:us-east-1", "up", node_types=("t3.micro", "t3.small"),
                lease_end="2030-01-02T03:04:05Z")
    add_student(store, "bob", "aws:us-east-1", "applying", node_types=("t3.micro",))
    add_student(store, "carol", "gcp:us-central1-a", "failed", error="QuotaExceeded: CPUS in us-central1")
    add_student(store, "dave", "sim", "up", node_types=("compute_skylake",), lease_end="2030-01-01T00:00:00+00:00")
    add_student(store, "erin", "aws:us-east-1", "up", node_types=("no.such-type",))
    add_student(store, "zed", "sim", "up", course="other-course")  # another class: not shown
    add_student(store, "yan", "sim", "up", lab="other-lab")

    data = status_json(served)
    prices = load_prices()["aws"]["us-east-1"]
    assert (data["course"], data["lab"], data["total"]) == (COURSE, LAB, 5)
    assert [s["id"] for s in data["students"]] == ["alice", "bob", "carol", "dave", "erin"]
    assert data["counts"] == {"up": 3, "applying": 1, "failed": 1}
    by = {s["id"]: s for s in data["students"]}
    assert by["alice"]["lease_end_ts"] == 1893553445.0 and by["dave"]["lease_end_ts"] == 1893456000.0
    assert by["bob"]["lease_end_ts"] is None
    assert by["alice"]["cost_per_hour"] == pytest.approx(prices["t3.micro"] + prices["t3.small"])
    assert by["dave"]["cost_per_hour"] is None  # Chameleon: SUs, not dollars
    assert by["erin"]["cost_per_hour"] is None and by["erin"]["unpriced"] == ["aws/us-east-1/no.such-type"]
    assert data["failures"] == [{"id": "carol", "site": "gcp:us-central1-a",
                                 "error": "QuotaExceeded: CPUS in us-central1"}]
    sites = {s["site"]: s for s in data["sites"]}
    assert sites["aws:us-east-1"]["counts"] == {"up": 2, "applying": 1} and sites["aws:us-east-1"]["total"] == 3
    assert sites["aws:us-east-1"]["cost_per_hour"] == pytest.approx(2 * prices["t3.micro"] + prices["t3.small"])
    assert sites["sim"]["cost_per_hour"] is None and sites["gcp:us-central1-a"]["counts"] == {"failed": 1}
    assert data["cost"]["per_hour"] == pytest.approx(2 * prices["t3.micro"] + prices["t3.small"])
    assert data["cost"]["currency"] == "USD" and data["cost"]["unpriced"] == ["aws/us-east-1/no.such-type"]


def test_a_failed_setup_step_is_a_failure_with_its_step(served: Any, ctx: Any) -> None:
    dep = add_student(ctx.store, "alice", "sim", "up", node_types=("compute_skylake",))
    ctx.store.mark_step(dep, "node-1", 0, "install", "failed", "exit 1")
    data = status_json(served)
    assert data["failures"] == [{"id": "alice", "site": "sim", "error": "node-1: failed: install"}]


def test_status_follows_the_store_without_restart(served: Any, ctx: Any) -> None:
    assert status_json(served)["total"] == 0
    dep = add_student(ctx.store, "alice", "sim", "applying")
    assert status_json(served)["counts"] == {"applying": 1}
    ctx.store.set_deployment_status(dep, "failed", error="NoCapacity: no free host")
    data = status_json(served)
    assert data["counts"] == {"failed": 1} and data["failures"][0]["error"] == "NoCapacity: no free host"
    ctx.store.forget_deployment(dep)  # class down
    assert status_json(served)["total"] == 0


def test_hostile_roster_values_come_back_as_data_with_control_characters_gone(served: Any, ctx: Any) -> None:
    add_student(ctx.store, HOSTILE_ID, "sim", "failed", error=HOSTILE_ERROR + "\x1b[31m\r\nsecond line",
                name="Robert'); DROP TABLE students;--\x07")
    data = status_json(served)
    (student,) = data["students"]
    assert student["id"] == HOSTILE_ID  # the page shows it as text (tests/dashboard/test_dashboard_browser.py)
    assert student["name"] == "Robert'); DROP TABLE students;--"
    assert data["failures"][0]["error"] == HOSTILE_ERROR + "[31msecond line"


def test_a_store_that_fails_gives_503_and_the_server_keeps_serving(served: Any, ctx: Any) -> None:
    add_student(ctx.store, "alice", "sim", "up")
    token = served.board.token
    ctx.store.close()  # the database is gone under the running dashboard
    response = get(served, f"/{token}/api/status")
    assert response.status == 503
    assert json.loads(response.body)["error"].startswith("cannot read the state store")  # type: ignore[attr-defined]
    assert get(served, f"/{token}/").status == 200


# -- the page's own text ------------------------------------------------------------------------------
class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags.append(tag)


def _tags(text: str) -> list[str]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


@given(lab=st.text(min_size=1, max_size=60), course=st.text(min_size=1, max_size=60))
def test_page_escapes_lab_and_course_whatever_they_are(lab: str, course: str) -> None:
    from labctl.dashboard import page

    text = page.render(lab, course, 2.0)
    assert _tags(text) == _tags(page.render("hello", "ml-sys", 2.0))  # no markup of theirs became a tag
    assert text.count(page.SCRIPT) == 1 and text.count(page.STYLE) == 1  # the CSP hashes still match
