"""The emulators' one router (`labctl.testbed.http.Router`, werkzeug's underneath) and the shared control tables."""

from __future__ import annotations

import sqlite3

import pytest

from labctl.testbed.errors import HTTPError
from labctl.testbed.gce import api as gce_api
from labctl.testbed.gce.common import ApiError
from labctl.testbed.http import Router


def _router() -> Router:
    router = Router()
    router.add("GET", "/servers", lambda req: "list")
    router.add("GET", "/servers/detail", lambda req: "detail")
    router.add("GET|DELETE", "/servers/{id}", lambda req: "one", auth=False)
    router.add("POST", "/servers/{id}/action", lambda req: "action")
    return router


def test_templates_match_whole_segments_and_static_ones_win():
    router = _router()
    route, params = router.match("GET", "/servers/detail")
    assert route.template == "/servers/detail" and params == {}
    route, params = router.match("DELETE", "/servers/abc/")  # a trailing slash is ignored
    assert (route.method, route.template, route.auth, params) == ("DELETE", "/servers/{id}", False, {"id": "abc"})
    assert router.match("GET", "/servers/a/b") is None
    assert router.match("GET", "//servers") is None
    assert router.match("GET", "/servers//action") is None


def test_a_path_known_under_other_methods_is_a_405_in_the_apis_shape():
    router = _router()
    with pytest.raises(HTTPError) as err:
        router.match("PUT", "/servers/abc")
    assert (err.value.status, err.value.kind) == (405, "HTTPMethodNotAllowed")
    assert router.match("HEAD", "/servers")[0].method == "GET"  # HEAD is a GET without its body
    with pytest.raises(ApiError) as gerr:  # Compute Engine's own 405; it has no HEAD
        gce_api.match("HEAD", "/compute/v1/projects/p/zones")
    assert (gerr.value.status, gerr.value.reason) == (405, "methodNotAllowed")
    assert gce_api.match("GET", "/compute/v1/projects/p/zones/z/instances/vm-1")[:1] == ("instances.get",)
    assert gce_api.match("GET", "/compute/v2/projects/p/zones") is None


def test_a_world_made_before_the_shared_control_tables_gets_them(tmp_path):
    """A world file from before faults, latency and the request log were shared (other columns) is given the
    shared tables; the rest of it stays."""
    from labctl.testbed.gce.world import GceWorld

    GceWorld(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "gce.db")
    conn.execute("DROP TABLE faults")
    conn.execute("CREATE TABLE faults (id INTEGER PRIMARY KEY AUTOINCREMENT, operation TEXT NOT NULL, "
                 "kind TEXT NOT NULL, remaining INTEGER NOT NULL, message TEXT)")
    conn.execute("INSERT INTO meta (key, value) VALUES ('kept', 'yes')")
    conn.commit()
    conn.close()
    world = GceWorld(tmp_path)
    try:
        world.inject_fault("instances.*", "error503", 2)
        assert world.take_fault("instances.insert") == ("error503", None)
        assert world.faults() == [{"operation": "instances.*", "kind": "error503", "remaining": 1, "message": None}]
        with world.read() as db:
            assert db.meta("kept") == "yes"
    finally:
        world.close()
