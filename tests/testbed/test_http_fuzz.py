"""Hostile and careless HTTP against the emulators: never a 5xx, every refusal in the API's own error shape.

Property-based (Hypothesis): random methods × the emulators' own route tables × random query strings × random
bodies (JSON of the wrong shape, invalid JSON, deep nesting, huge numbers, unicode, control characters) × with
or without valid credentials, sent as raw HTTP to the emulated Chameleon, the emulated Compute Engine and the
EC2 front layer. `HYPOTHESIS_PROFILE=long` runs ten times more examples.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from labctl.testbed import Testbed
from labctl.testbed.gce import api as gce_api
from labctl.testbed.gce import catalog as gce_catalog
from labctl.testbed.gce import common as gce_common
from labctl.testbed.gce import disks as gce_disks
from labctl.testbed.gce import firewalls as gce_firewalls
from labctl.testbed.gce import instances as gce_instances
from labctl.testbed.gce import networks as gce_networks
from labctl.testbed.gce import start_gce
from labctl.testbed.gce import zones as gce_zones
from labctl.testbed.http import MAX_JSON_BODY
from labctl.testbed.openstack import blazar, cinder, glance, keystone, neutron, nova, swift
from labctl.testbed.openstack import catalog as cat

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = 4000 if LONG else 400
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkKvZ0Qz2Zl7uF6yN1dYx3dQ3bVQ3bVQ3bVQ3bVQ3bV fuzz"
READ_TIMEOUT = 1.5  # the emulators' read timeout in this module (LABCTL_TESTBED_READ_TIMEOUT)

SERVICES = {  # service path segment -> (module, the prefix the clients put before the route templates)
    "identity": (keystone, ""),
    "compute": (nova, "/v2.1"),
    "network": (neutron, ""),
    "image": (glance, ""),
    "reservation": (blazar, "/v1"),
    "volume": (cinder, "/v3"),
    "object-store": (swift, "/v1"),
}
OS_ROUTES = sorted({(svc, r.method, prefix + r.template) for svc, (mod, prefix) in SERVICES.items()
                    for r in mod.router.routes})
OS_HANDLERS = {(svc, r.method, prefix + r.template): r.handler for svc, (mod, prefix) in SERVICES.items()
               for r in mod.router.routes}
WRITES = [r for r in OS_ROUTES if r[1] in ("POST", "PUT")]  # sampled more often: they read bodies
GCE_ROUTES = [(method, "/compute/v1/" + tpl) for method, tpl, _, _ in gce_api.ROUTES]

# ----------------------------------------------------------------------------------------- strategies
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1e999", "10.0.0.0/24", "192.168.1.5", "tcp", "ingress", "IPv4", "default",
                     "2020-01-01 00:00", "now", "\x00\x1b[31m", "é\u202e", "a" * 300]),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
KEYS = ["name", "id", "flavorRef", "imageRef", "networks", "key_name", "min_count", "max_count", "network_id",
        "subnet_id", "cidr", "ip_version", "gateway_ip", "fixed_ips", "port_id", "device_id", "reservations",
        "start_date", "end_date", "size", "remote_ip_prefix", "protocol", "port_range_min", "port_range_max",
        "direction", "ethertype", "resource_type", "min", "max", "amount", "hypervisor_properties",
        "resource_properties", "tags", "description", "admin_state_up", "external_gateway_info",
        "security_groups", "security_group_id", "metadata", "meta", "volumeId", "device", "public_key", "type",
        "floating_network_id", "floating_ip_address", "subnet", "port", "router_id", "network", "server",
        "flavor_id", "lease_id", "before_end", "port_security_enabled", "allocation_pools", "enable_dhcp",
        "volumeAttachment", "addFloatingIp", "removeFloatingIp", "address", "reboot", "os-stop", "os-start",
        "identity", "methods", "application_credential", "password", "user", "secret", "auth",
        "machineType", "disks", "networkInterfaces", "accessConfigs", "labels", "allowed", "denied",
        "sourceRanges", "targetTags", "ipCidrRange", "sizeGb", "region", "zone", "guestAccelerators",
        "initializeParams", "sourceImage", "autoCreateSubnetworks", "IPProtocol", "ports", "natIP", "source",
        "deviceName", "boot", "autoDelete", "networkIP", "priority", "direction", "addressType", "nics",
        "scheduling", "metadata", "items", "key", "value", "routingConfig", "mtu", "diskSizeGb"]
shaped = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=16)
wrapped = st.builds(lambda key, inner: {key: inner}, st.sampled_from(KEYS), shaped)


_KEY_RE = re.compile(r"""(?:\.get\(|\[|\bin\s)["']([A-Za-z_][\w:-]{0,40})["']""")


def _with_submodules(obj) -> list:
    """`obj`, and when it is a package, every module in it (the emulators' services and models are packages)."""
    import importlib
    import pkgutil

    out = [obj]
    for info in pkgutil.iter_modules(getattr(obj, "__path__", None) or []):
        out.append(importlib.import_module(f"{obj.__name__}.{info.name}"))
    return out


def source_keys(*objects) -> list[str]:
    """The field names the emulators' code reads (`.get("x")`, `["x"]`, `"x" in`): aimed bodies use them."""
    import inspect

    found: set[str] = set()
    for obj in objects:
        for part in _with_submodules(obj):
            found |= set(_KEY_RE.findall(inspect.getsource(inspect.unwrap(part))))
    return sorted(found)


def handler_keys(service: str, route: tuple[str, str, str]) -> list[str]:
    """The keys one route's handler reads, with those of the model functions and the helpers of its own service
    it calls (else its service's)."""
    import inspect

    handler = inspect.unwrap(OS_HANDLERS[route])
    source = inspect.getsource(handler)
    called = [getattr(os_model, name) for name in re.findall(r"model\.(\w+)\(", source)
              if callable(getattr(os_model, name, None))]
    module = inspect.getmodule(handler)
    helpers = [fn for name in set(re.findall(r"(?<![.\w])(\w+)\(", source))
               if inspect.isfunction(fn := getattr(module, name, None)) and fn is not handler
               and fn.__module__.startswith("labctl.testbed.")]
    return source_keys(handler, *called, *helpers) or OS_KEYS[service]


from labctl.testbed.openstack import model as os_model  # noqa: E402

OS_KEYS = {svc: source_keys(mod, os_model) for svc, (mod, _) in SERVICES.items()}
GCE_KEYS = source_keys(gce_api, gce_common, gce_zones, gce_instances, gce_networks, gce_firewalls, gce_disks)


def _deep(n: int) -> bytes:
    return ("[" * n + "]" * n).encode()


bodies = st.one_of(
    st.just(b""),
    json_value.map(lambda v: json.dumps(v).encode()),
    shaped.map(lambda v: json.dumps(v).encode()),
    wrapped.map(lambda v: json.dumps(v).encode()),
    wrapped.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"{", b"{\"a\":", b"nul", b"[1,]", b"\xff\xfe", b"{\"a\": NaN}", b"1" * 5000,
                     _deep(100), _deep(5000), ("{\"a\":" * 3000 + "1" + "}" * 3000).encode(), b"[" * 100000,
                     b'"\\ud800"', b"[1e999999]", b'{"a": 1, "a": 2}']),
)
segment = st.one_of(
    st.builds(lambda i: KNOWN_IDS[i % len(KNOWN_IDS)] if KNOWN_IDS else "x", st.integers(0, 1000)),
    st.builds(lambda i: KNOWN_IDS[i % len(KNOWN_IDS)] if KNOWN_IDS else "x", st.integers(0, 1000)),
    st.sampled_from([cat.PROJECT_ID, f"AUTH_{cat.PROJECT_ID}", "default", cat.USER_ID, "sim-project",
                     "us-central1", "us-central1-a", "e2-small", "debian-12", "compute_liqid", "sharednet1",
                     "public", "1", "0", "-1", "..", ".", "detail", "action", "x" * 300]),
    st.text(min_size=1, max_size=12).map(lambda t: quote(t, safe="")),
)
query_values = st.one_of(st.sampled_from(["-1", "0", "1", "abc", "", "1e3", "99999999999999999999", "true",
                                          "name eq x", "name = \"x\"", "(a = 1) OR", "desc", "x" * 200]),
                         st.text(max_size=10))
query_keys = st.sampled_from(["limit", "marker", "name", "status", "all_tenants", "fields", "sort_key", "sort_dir",
                              "tags", "tags-any", "not-tags", "page_reverse", "id", "project_id", "network_id",
                              "maxResults", "pageToken", "filter", "orderBy", "requestId", "returnPartialSuccess",
                              "format", "prefix", "delimiter", "multipart-manifest", "detail", "zzz-unknown"])
queries = st.lists(st.tuples(query_keys, query_values), max_size=4)
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
own_method = st.one_of(st.none(), st.none(), st.none(), methods)  # None: the route's own method
KNOWN_IDS: list[str] = []  # ids of things that exist in the fuzzed world (filled by the `tokens` fixture)


def resource_key(template: str) -> str:
    """The body's wrapper key a route's template suggests: ".../os-keypairs" -> "keypair", "/v2.0/floatingips/{id}"
    -> "floatingip", ".../security-group-rules" -> "security_group_rule"."""
    static = [p for p in template.split("/") if p and not p.startswith("{") and not re.match(r"v\d", p)] or ["x"]
    word = static[-1].removeprefix("os-").replace("-", "_")
    word = word[:-3] + "y" if word.endswith("ies") else word[:-1] if word.endswith("s") else word
    return {"volume_attachment": "volumeAttachment", "tag": "tags", "token": "auth"}.get(word, word)


def aimed_values(keys: list[str]) -> st.SearchStrategy:
    return st.recursive(json_leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(keys), inner, max_size=5)), max_leaves=12)


def route_bodies(route: tuple[str, str, str]) -> st.SearchStrategy[bytes]:
    """Bodies aimed at one route: its resource wrapper around the fields its handler reads, with values of random
    types, besides everything else."""
    service, _, template = route
    key = resource_key(template)
    keys = handler_keys(service, route)
    fields = st.dictionaries(st.sampled_from(keys), aimed_values(keys), min_size=1, max_size=8)
    aimed = st.one_of(fields.map(lambda d: {key: d}), fields, aimed_values(keys).map(lambda v: {key: v}))
    return st.one_of(aimed, aimed, aimed, bodies).map(lambda v: v if isinstance(v, bytes) else json.dumps(v).encode())


def fill(template: str, values: list[str]) -> str:
    it = iter(values)
    return re.sub(r"\{\w+\}", lambda _: next(it, "x"), template)


# ----------------------------------------------------------------------------------------- raw HTTP
def send(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def read_answer(s: socket.socket) -> tuple[int, bytes]:
    """The status and body of the answer on a raw socket."""
    resp = http.client.HTTPResponse(s)
    resp.begin()
    return resp.status, resp.read()


def openstack_error_ok(service: str, status: int, headers: dict[str, str], data: bytes, method: str) -> None:
    """A 4xx of the emulated Chameleon in the real service's error shape."""
    if method == "HEAD" or status == 204:
        return
    if status == 401:  # keystonemiddleware answers for every service, in Keystone's shape
        assert json.loads(data)["error"]["code"] == 401
        return
    if service in ("image", "object-store"):  # webob / swift: HTML pages
        assert data.lstrip().startswith(b"<html>"), data[:200]
        return
    body = json.loads(data)
    if service == "identity":
        assert body["error"]["code"] == status and isinstance(body["error"]["message"], str)
    elif service in ("compute", "volume"):
        (inner,) = body.values()
        assert inner["code"] == status and isinstance(inner["message"], str)
    elif service == "network":
        assert isinstance(body["NeutronError"]["message"], str) and body["NeutronError"]["type"]
    elif service == "reservation":
        assert body["error_code"] == status and isinstance(body["error_message"], str)
    else:
        raise AssertionError(f"unknown service {service}")


def gce_error_ok(status: int, data: bytes, method: str) -> None:
    if method == "HEAD":
        return
    error = json.loads(data)["error"]
    assert error["code"] == status and isinstance(error["message"], str)
    assert error["errors"] and all(e["domain"] == "global" and e["reason"] for e in error["errors"])


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def short_timeout():
    saved = os.environ.get("LABCTL_TESTBED_READ_TIMEOUT")
    os.environ["LABCTL_TESTBED_READ_TIMEOUT"] = str(READ_TIMEOUT)
    yield READ_TIMEOUT
    if saved is None:
        os.environ.pop("LABCTL_TESTBED_READ_TIMEOUT", None)
    else:
        os.environ["LABCTL_TESTBED_READ_TIMEOUT"] = saved


@pytest.fixture(scope="module")
def tb(tmp_path_factory, short_timeout):
    with Testbed.start(tmp_path_factory.mktemp("fuzz-world"), time_scale=0.001, ssh=False) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def tokens(tb):
    """A valid token per site (the world's application credential)."""
    creds = tb.world.credentials
    out = {}
    for site in ("chi-tacc", "kvm-tacc"):
        status, headers, _ = send(tb.port, "POST", f"/{site}/identity/v3/auth/tokens",
                                  {"Content-Type": "application/json"},
                                  json.dumps({"auth": {"identity": {"methods": ["application_credential"],
                                                                    "application_credential": {
                                                                        "id": creds.app_cred_id,
                                                                        "secret": creds.app_cred_secret}}}}).encode())
        assert status == 201
        out[site] = headers["x-subject-token"]
    # Things that exist, so that the fuzzer reaches past "not found" (a keypair, a security group, a network).
    auth = {"X-Auth-Token": out["chi-tacc"], "Content-Type": "application/json"}
    for path, body in (("/compute/v2.1/os-keypairs", {"keypair": {"name": "fuzz", "public_key": PUBKEY}}),
                       ("/network/v2.0/security-groups", {"security_group": {"name": "fuzz"}}),
                       ("/network/v2.0/networks", {"network": {"name": "fuzz"}})):
        status, _, _ = send(tb.port, "POST", "/chi-tacc" + path, auth, json.dumps(body).encode())
        assert status in (200, 201)
    for path, key in (("/network/v2.0/networks", "networks"), ("/network/v2.0/subnets", "subnets"),
                      ("/network/v2.0/security-groups", "security_groups"), ("/network/v2.0/routers", "routers"),
                      ("/compute/v2.1/flavors", "flavors"), ("/image/v2/images", "images"),
                      ("/compute/v2.1/os-keypairs", "keypairs")):
        status, _, data = send(tb.port, "GET", "/chi-tacc" + path, auth)
        assert status == 200
        for item in json.loads(data)[key]:
            item = item.get("keypair", item)
            KNOWN_IDS.append(item.get("id") or item["name"])
    return out


@pytest.fixture(scope="module")
def gce(tmp_path_factory, short_timeout):
    emulator = start_gce(tmp_path_factory.mktemp("fuzz-gce"), time_scale=0.001)
    yield emulator
    emulator.stop()


# ----------------------------------------------------------------------------------------- properties
@FUZZ
@given(route=st.one_of(st.sampled_from(OS_ROUTES), st.sampled_from(WRITES), st.sampled_from(WRITES)),
       method=own_method, site=st.sampled_from(
    ["chi-tacc", "kvm-tacc"]), values=st.lists(segment, min_size=4, max_size=4), query=queries, data=st.data(),
    auth=st.sampled_from(["valid", "valid", "valid", "none", "bogus"]), ctype=st.sampled_from(
        ["application/json", "application/octet-stream", "text/plain; charset=\x7f", None]))
def test_openstack_never_answers_5xx(tb, tokens, route, method, site, values, query, data, auth, ctype):
    service, route_method, template = route
    body = data.draw(route_bodies(route), label="body")
    method = method or route_method
    path = f"/{site}/{service}" + fill(template, values)
    if query:
        path += "?" + urlencode(query)
    headers = {}
    if auth == "valid":
        headers["X-Auth-Token"] = tokens[site]
    elif auth == "bogus":
        headers["X-Auth-Token"] = "gAAAAA" + "0" * 64
    if ctype:
        headers["Content-Type"] = ctype
    status, resp_headers, data = send(tb.port, method, path, headers, body)
    event(f"HTTP {status}")
    if os.environ.get("FUZZ_COLLECT"):
        event(f"{method} {service} {template} {status} {auth}")
    if os.environ.get("FUZZ_COLLECT"):  # hunting: let the run go on, the server prints each bug's traceback
        return
    assert status < 500, (method, path, body[:300], data[:500])
    assert not tb._server.app.unvalidated, (method, path, body[:300])  # a 400 only the catch-all gave
    if status >= 400:
        openstack_error_ok(service, status, resp_headers, data, method)


@FUZZ
@given(route=st.sampled_from(GCE_ROUTES), method=own_method,
       project=st.sampled_from(["sim-project", "sim-project", "debian-cloud", "other"]),
       zone=st.sampled_from([*sorted(gce_catalog.ZONES)[:3], "nowhere-1a"]),
       region=st.sampled_from(["us-central1", "europe-west4", "nowhere"]),
       values=st.lists(segment, min_size=2, max_size=2), query=queries, data=st.data(),
       auth=st.sampled_from(["valid", "valid", "valid", "none", "bogus", "basic"]))
def test_gce_never_answers_5xx(gce, route, method, project, zone, region, values, query, data, auth):
    route_method, template = route
    fields = st.dictionaries(st.sampled_from(GCE_KEYS), aimed_values(GCE_KEYS), max_size=8)
    body = data.draw(st.one_of(fields.map(lambda d: json.dumps(d).encode()), fields.map(
        lambda d: json.dumps(d).encode()), bodies), label="body")
    method = method or route_method
    filled = template.replace("{project}", project).replace("{zone}", zone).replace("{region}", region)
    path = fill(filled, values)
    if query:
        path += "?" + urlencode(query)
    headers = {"Content-Type": "application/json"}
    if auth == "valid":
        headers["Authorization"] = f"Bearer {gce.token}"
    elif auth == "bogus":
        headers["Authorization"] = "Bearer ya29.not-this-worlds-token"
    elif auth == "basic":
        headers["Authorization"] = "Basic dXNlcjpwYXNz"
    status, _, data = send(gce.port, method, path, headers, body)
    event(f"HTTP {status}")
    if os.environ.get("FUZZ_COLLECT"):
        return
    assert status < 500, (method, path, body[:300], data[:500])
    assert not gce_api.UNVALIDATED, (method, path, body[:300])  # a 400 only the catch-all gave
    if status >= 400:
        gce_error_ok(status, data, method)
    if auth != "valid":
        assert status == 401


# ----------------------------------------------------------------------------------------- explicit cases
def test_huge_content_length_is_refused_quickly_without_reading(tb, gce, tokens):
    for port, path, headers in (
        (tb.port, "/chi-tacc/compute/v2.1/servers", {"X-Auth-Token": tokens["chi-tacc"]}),
        (tb.port, f"/chi-tacc/object-store/v1/AUTH_{cat.PROJECT_ID}/c/o", {"X-Auth-Token": tokens["chi-tacc"]}),
        (gce.port, "/compute/v1/projects/sim-project/global/networks", {"Authorization": f"Bearer {gce.token}"}),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            start = time.monotonic()
            head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n"
            s.sendall((head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
            status, _ = read_answer(s)
            assert status == 413
            assert time.monotonic() - start < 2
    # Just over the JSON cap on a JSON API: refused the same way.
    status, _, data = send(tb.port, "POST", "/chi-tacc/compute/v2.1/servers", {"X-Auth-Token": tokens["chi-tacc"]},
                           b" " * (MAX_JSON_BODY + 1))
    assert status == 413 and json.loads(data)["overLimit"]["code"] == 413


@pytest.mark.parametrize("length", ["-1", "abc", "1, 2", "0x10", "+5", " "])
def test_bad_content_length_is_a_400(tb, gce, length):
    for port, path in ((tb.port, "/chi-tacc/identity/v3/auth/tokens"),
                       (gce.port, "/compute/v1/projects/sim-project/global/networks")):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
            status, data = read_answer(s)
        assert status == 400, (length, data[:200])
        assert json.loads(data)["error"]["code"] == 400


@pytest.mark.parametrize("chunk", [b"ffffffffffffffff", b"zz", b"1" * 2000, b"-5", b"100000000"])
def test_bad_or_huge_chunk_sizes_are_refused_without_allocating(tb, chunk):
    with socket.create_connection(("127.0.0.1", tb.port), timeout=5) as s:
        s.sendall(b"POST /chi-tacc/identity/v3/auth/tokens HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunk + b"\r\n")
        status, data = read_answer(s)
    assert status == (413 if chunk in (b"100000000", b"ffffffffffffffff") else 400), (chunk, data[:200])
    assert json.loads(data)["error"]["code"] == status


def test_chunked_body_within_limits_is_read(tb):
    creds = tb.world.credentials
    body = json.dumps({"auth": {"identity": {"methods": ["application_credential"], "application_credential": {
        "id": creds.app_cred_id, "secret": creds.app_cred_secret}}}}).encode()
    half = len(body) // 2
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", tb.port), timeout=5) as s:
        s.sendall(b"POST /chi-tacc/identity/v3/auth/tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 201 ")


@pytest.mark.parametrize("partial", [b"", b"GET /chi-tacc/identity/v3 HTTP/1.1\r\nHost: x\r\n",
                                     b"POST /chi-tacc/identity/v3/auth/tokens HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 100\r\n\r\n{\"auth\":"])
def test_a_silent_client_is_disconnected_after_the_read_timeout(tb, partial):
    with socket.create_connection(("127.0.0.1", tb.port), timeout=10) as s:
        s.sendall(partial)
        start = time.monotonic()
        data = s.recv(65536)  # blocks until the server gives up on us
        waited = time.monotonic() - start
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:200]
    assert READ_TIMEOUT * 0.8 <= waited < READ_TIMEOUT + 5
    # and the server still answers others
    status, _, _ = send(tb.port, "GET", "/chi-tacc/identity/v3")
    assert status == 200


@pytest.mark.parametrize("query", ["limit=-1", "limit=abc", "limit=1e3", "marker=nope"])
def test_bad_paging_parameters_are_400s(tb, tokens, query):
    for path, shape in (("/chi-tacc/compute/v2.1/servers", "compute"), ("/chi-tacc/network/v2.0/networks", "network"),
                        ("/chi-tacc/image/v2/images", "image")):
        status, headers, data = send(tb.port, "GET", f"{path}?{query}", {"X-Auth-Token": tokens["chi-tacc"]})
        if query == "marker=nope" and shape == "network":
            assert status == 200  # Neutron: an unknown marker is an empty page
            continue
        assert status == 400, (path, query, data[:300])
        openstack_error_ok(shape, status, headers, data, "GET")


@pytest.mark.parametrize("body", [b"[]", b"[1, 2]", b"42", b"\"text\"", b"null", b"true", _deep(65), _deep(100000)])
def test_non_object_and_deeply_nested_bodies_are_400s(tb, tokens, gce, body):
    auth = {"X-Auth-Token": tokens["chi-tacc"], "Content-Type": "application/json"}
    for method, path, service in (("POST", "/chi-tacc/compute/v2.1/servers", "compute"),
                                  ("PUT", "/chi-tacc/compute/v2.1/servers/x/tags", "compute"),
                                  ("POST", "/chi-tacc/network/v2.0/networks", "network"),
                                  ("PUT", "/chi-tacc/network/v2.0/networks/x", "network"),
                                  ("POST", "/chi-tacc/reservation/v1/leases", "reservation"),
                                  ("POST", "/chi-tacc/identity/v3/auth/tokens", "identity")):
        status, headers, data = send(tb.port, method, path, auth, body)
        assert status in (400, 404), (method, path, body[:50], data[:300])
        openstack_error_ok(service, status, headers, data, method)
    status, _, data = send(gce.port, "POST", "/compute/v1/projects/sim-project/global/networks",
                           {"Authorization": f"Bearer {gce.token}"}, body)
    assert status == 400
    error = json.loads(data)["error"]
    assert error["status"] == "INVALID_ARGUMENT" and error["errors"][0]["reason"] == "parseError"


# ----------------------------------------------------------------------------------------- files
def test_world_files_are_private(tb, gce):
    for directory in (Path(tb.world.state_dir), Path(gce.world.state_dir)):
        assert oct(directory.stat().st_mode & 0o777) == "0o700"
        files = [p for p in directory.iterdir() if p.is_file()]
        assert {p.name for p in files} >= {"credentials.json"}
        assert any(p.name in ("world.db", "gce.db") for p in files)
        for p in files:
            assert oct(p.stat().st_mode & 0o777) == "0o600", p
