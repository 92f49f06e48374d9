"""What gcloud needs of the emulated Compute Engine, checked over plain HTTP (`requests`) and google-cloud-compute.

gcloud itself cannot be installed here (its packages come from Google's own apt repository, which this
workplace does not reach), so these tests send the requests gcloud sends: `instances create --image-family F
--image-project P` names its boot image as `.../projects/P/zones/-/imageFamilyViews/F`; list commands go
through the batch endpoint (`POST /batch/compute/v1`, multipart/mixed, serialized the way apitools' batch does
it); `gcloud config`/`compute` commands read the project (`projects.get`). Besides: every reference form the API
documents (full URLs on compute.googleapis.com and www.googleapis.com, partial URLs, names), malformed
references (400 `invalid`) and missing ones (404 `notFound`), in Compute Engine's error shape.
"""

from __future__ import annotations

import email.generator
import email.mime.multipart
import email.mime.nonmultipart
import email.parser
import io
import uuid

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import compute_v1
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.fixtures.gce import clients, emu  # noqa: F401

ZONE = "us-central1-a"
UBUNTU = "ubuntu-os-cloud"
FAMILY = "ubuntu-2404-lts-amd64"
NEWEST = "ubuntu-2404-noble-amd64-v20251014"  # the family's newest image that is not deprecated
GOOGLE = "https://compute.googleapis.com/compute/v1/"
WWW = "https://www.googleapis.com/compute/v1/"


def api(emu, method: str, path: str, **kw) -> requests.Response:  # noqa: F811
    headers = {"Authorization": f"Bearer {emu.token}", **kw.pop("headers", {})}
    return requests.request(method, f"{emu.endpoint}/compute/v1/{path}", headers=headers, timeout=30, **kw)


def create(emu, name: str, image: str, machine: str = f"zones/{ZONE}/machineTypes/e2-small",  # noqa: F811
           network: str = "global/networks/default") -> requests.Response:
    body = {"name": name, "machineType": machine,
            "disks": [{"boot": True, "autoDelete": True, "initializeParams": {"sourceImage": image}}],
            "networkInterfaces": [{"network": network, "accessConfigs": [{"type": "ONE_TO_ONE_NAT"}]}]}
    return api(emu, "POST", f"projects/{emu.project}/zones/{ZONE}/instances", json=body)


def assert_error(resp: requests.Response, code: int, reason: str) -> dict:
    assert resp.status_code == code, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    assert [(e["domain"], e["reason"]) for e in error["errors"]] == [("global", reason)]
    assert error["errors"][0]["message"] == error["message"]
    return error


IMAGE_FORMS = [
    f"{GOOGLE}projects/{UBUNTU}/zones/-/imageFamilyViews/{FAMILY}",  # gcloud --image-family/--image-project
    f"{GOOGLE}projects/{UBUNTU}/zones/{ZONE}/imageFamilyViews/{FAMILY}",
    f"projects/{UBUNTU}/zones/-/imageFamilyViews/{FAMILY}",
    f"{GOOGLE}projects/{UBUNTU}/global/images/family/{FAMILY}",
    f"{WWW}projects/{UBUNTU}/global/images/family/{FAMILY}",
    f"projects/{UBUNTU}/global/images/family/{FAMILY}",
    f"{GOOGLE}projects/{UBUNTU}/global/images/{NEWEST}",
    f"projects/{UBUNTU}/global/images/{NEWEST}",
]


@pytest.mark.parametrize("image", IMAGE_FORMS)
def test_every_image_reference_form_boots_the_right_image(emu, image):  # noqa: F811
    resp = create(emu, "vm-img", image)
    assert resp.status_code == 200, resp.text
    inst = api(emu, "GET", f"projects/{emu.project}/zones/{ZONE}/instances/vm-img").json()
    assert inst["disks"][0]["licenses"] == [f"{emu.endpoint}/compute/v1/projects/{UBUNTU}/global/licenses/{FAMILY}"]


@pytest.mark.parametrize("form", [
    f"{GOOGLE}projects/{{p}}/zones/{ZONE}/machineTypes/e2-small",
    f"{WWW}projects/{{p}}/zones/{ZONE}/machineTypes/e2-small",
    f"projects/{{p}}/zones/{ZONE}/machineTypes/e2-small",
    f"zones/{ZONE}/machineTypes/e2-small",
    "e2-small",
])
def test_machine_type_and_network_forms(emu, form):  # noqa: F811
    machine = form.format(p=emu.project)
    network = machine.replace(f"zones/{ZONE}/machineTypes/e2-small", "global/networks/default") \
        if "/" in machine else "default"
    resp = create(emu, "vm-mt", f"projects/{UBUNTU}/global/images/family/{FAMILY}", machine, network)
    assert resp.status_code == 200, resp.text
    inst = api(emu, "GET", f"projects/{emu.project}/zones/{ZONE}/instances/vm-mt").json()
    assert inst["machineType"].endswith(f"/projects/{emu.project}/zones/{ZONE}/machineTypes/e2-small")
    assert inst["networkInterfaces"][0]["network"].endswith(f"/projects/{emu.project}/global/networks/default")


def test_the_selflinks_the_emulator_returns_are_accepted_back(emu):  # noqa: F811
    image = api(emu, "GET", f"projects/{UBUNTU}/global/images/family/{FAMILY}").json()["selfLink"]
    machine = api(emu, "GET", f"projects/{emu.project}/zones/{ZONE}/machineTypes/e2-small").json()["selfLink"]
    network = api(emu, "GET", f"projects/{emu.project}/global/networks/default").json()["selfLink"]
    assert image.startswith(emu.endpoint)
    assert create(emu, "vm-self", image, machine, network).status_code == 200


@pytest.mark.parametrize("image", [
    "ubuntu-2404-lts-amd64",                                   # a bare name is no image reference
    f"projects/{UBUNTU}/global/networks/default",              # another kind of resource
    f"projects/{UBUNTU}/global/images/family/",                # no family
    f"projects/{UBUNTU}/global/images/a/b",
    f"https://example.com/projects/{UBUNTU}/global/images/{NEWEST}",  # a URL that is not the API's
    f"projects/{UBUNTU}/zones/-/images/{NEWEST}",              # "-" only for image family views
    "projects//global/images/x",
    " ",
])
def test_a_malformed_image_reference_is_a_400_invalid(emu, image):  # noqa: F811
    error = assert_error(create(emu, "vm-bad", image), 400, "invalid")
    assert "sourceImage" in error["message"]


@pytest.mark.parametrize("image", [
    f"projects/{UBUNTU}/global/images/ubuntu-1604-xenial-v20160101",
    f"projects/{UBUNTU}/global/images/family/no-such-family",
    f"projects/{UBUNTU}/zones/-/imageFamilyViews/no-such-family",
    f"projects/someone-elses-project/global/images/family/{FAMILY}",
    "global/images/my-custom-image",  # the request's own project, which has no custom images
])
def test_a_well_formed_reference_to_a_missing_image_is_a_404(emu, image):  # noqa: F811
    assert_error(create(emu, "vm-missing", image), 404, "notFound")


def test_missing_and_malformed_network_references(emu):  # noqa: F811
    image = f"projects/{UBUNTU}/global/images/family/{FAMILY}"
    assert_error(create(emu, "vm-n1", image, network="global/networks/nope"), 404, "notFound")
    assert_error(create(emu, "vm-n2", image, network="global/firewalls/default"), 400, "invalid")
    error = assert_error(create(emu, "vm-n3", image, machine=f"zones/{ZONE}/machineTypes/no-such-type"),
                         400, "invalid")
    assert "does not exist in zone" in error["message"]  # what Compute Engine says of a missing machine type


def test_projects_get(emu, clients):  # noqa: F811
    body = api(emu, "GET", f"projects/{emu.project}").json()
    assert body["kind"] == "compute#project" and body["name"] == emu.project and body["id"].isdigit()
    assert body["selfLink"] == f"{emu.endpoint}/compute/v1/projects/{emu.project}"
    assert body["commonInstanceMetadata"]["kind"] == "compute#metadata"
    assert body["defaultNetworkTier"] == "PREMIUM" and body["xpnProjectStatus"]
    quotas = {q["metric"]: q for q in body["quotas"]}
    assert quotas["NETWORKS"]["usage"] == 1.0 and quotas["CPUS_ALL_REGIONS"]["limit"] > 0
    project = clients.ProjectsClient.get(project=emu.project)  # the real client parses it
    assert project.name == emu.project and project.default_network_tier == "PREMIUM"
    with pytest.raises(gexc.NotFound):
        clients.ProjectsClient.get(project="someone-elses-project")
    assert_error(api(emu, "GET", "projects/someone-elses-project"), 404, "notFound")


def test_image_family_views_get(emu, clients):  # noqa: F811
    for zone in (ZONE, "-"):
        body = api(emu, "GET", f"projects/{UBUNTU}/zones/{zone}/imageFamilyViews/{FAMILY}").json()
        assert body["kind"] == "compute#imageFamilyView" and body["image"]["name"] == NEWEST
        assert body["image"]["selfLink"].endswith(f"/projects/{UBUNTU}/global/images/{NEWEST}")
    view = clients.ImageFamilyViewsClient.get(project=UBUNTU, zone=ZONE, family=FAMILY)
    assert view.image.name == NEWEST and view.image.family == FAMILY
    with pytest.raises(gexc.NotFound):
        clients.ImageFamilyViewsClient.get(project=UBUNTU, zone=ZONE, family="no-such-family")


# ------------------------------------------------------------------------------------------------- batch
def apitools_batch(emu, paths: list[str], token: str | None = None) -> tuple[str, list[str], bytes]:  # noqa: F811
    """A batch body as apitools (gcloud's HTTP layer) writes it: (Content-Type, the Content-IDs, body)."""
    base = uuid.uuid4()
    message = email.mime.multipart.MIMEMultipart("mixed")
    message._write_headers = lambda self: None  # type: ignore[attr-defined]  # as apitools does
    ids = []
    for n, path in enumerate(paths):
        part = email.mime.nonmultipart.MIMENonMultipart("application", "http")
        part["Content-Transfer-Encoding"] = "binary"
        part["Content-ID"] = f"<{base}+{n}>"
        ids.append(f"<response-{base}+{n}>")
        inner = email.mime.nonmultipart.MIMENonMultipart("application", "json")
        if token:
            inner["Authorization"] = f"Bearer {token}"
        inner["Host"] = emu.endpoint.split("//", 1)[1]
        out = io.StringIO()
        email.generator.Generator(out, maxheaderlen=0).flatten(inner, unixfrom=False)
        part.set_payload(f"GET /compute/v1/{path} HTTP/1.1\n" + out.getvalue())
        message.attach(part)
    body = message.as_string().encode()
    return f'multipart/mixed; boundary="{message.get_boundary()}"', ids, body


def parse_batch_answer(resp: requests.Response) -> list[tuple[str, int, dict]]:
    """As apitools reads it: (Content-ID, status, JSON body) per part."""
    import json

    mime = email.parser.Parser().parsestr(f"content-type: {resp.headers['Content-Type']}\r\n\r\n" + resp.text)
    assert mime.is_multipart()
    out = []
    for part in mime.get_payload():
        assert part.get_content_type() == "application/http"
        status_line, payload = part.get_payload().split("\n", 1)
        _, status, _ = status_line.split(" ", 2)
        inner = email.parser.Parser().parsestr(payload)
        assert inner["Content-Type"].startswith("application/json")
        out.append((part["Content-ID"], int(status), json.loads(inner.get_payload())))
    return out


def test_a_batch_of_two_lists_answers_both_in_order(emu):  # noqa: F811
    ctype, ids, body = apitools_batch(emu, [f"projects/{emu.project}/zones/{ZONE}/instances",
                                            f"projects/{UBUNTU}/global/images?maxResults=500"])
    resp = requests.post(f"{emu.endpoint}/batch/compute/v1", data=body, timeout=30,
                         headers={"Authorization": f"Bearer {emu.token}", "Content-Type": ctype})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("multipart/mixed; boundary=")
    parts = parse_batch_answer(resp)
    assert [p[0] for p in parts] == ids
    assert [p[1] for p in parts] == [200, 200]
    assert parts[0][2]["kind"] == "compute#instanceList"
    assert parts[1][2]["kind"] == "compute#imageList" and NEWEST in {i["name"] for i in parts[1][2]["items"]}
    logged = [r["operation"] for r in emu.world.request_log(detail=True)]
    assert logged[-3:] == ["batch", "instances.list", "images.list"]


def test_each_part_of_a_batch_goes_through_the_whole_pipeline(emu):  # noqa: F811
    def post(ctype: str, body: bytes, **headers: str) -> list[tuple[str, int, dict]]:
        resp = requests.post(f"{emu.endpoint}/batch/compute/v1", data=body, timeout=30,
                             headers={"Content-Type": ctype, **headers})
        assert resp.status_code == 200, resp.text
        return parse_batch_answer(resp)

    # no token outside: a part that carries one is served, the others are refused as direct requests are
    ctype, _, body = apitools_batch(emu, [f"projects/{emu.project}/zones"], token=emu.token)
    assert [p[1] for p in post(ctype, body)] == [200]
    ctype, _, body = apitools_batch(emu, [f"projects/{emu.project}/zones", f"projects/{emu.project}/regions"])
    parts = post(ctype, body)
    assert [p[1] for p in parts] == [401, 401]
    assert parts[0][2]["error"]["status"] == "UNAUTHENTICATED"
    # the outer token applies to every part: routing and not-found errors as for direct requests
    ctype, _, body = apitools_batch(emu, [f"projects/{emu.project}/zones/nowhere-1z",
                                          f"projects/{emu.project}/no/such/path"])
    parts = post(ctype, body, Authorization=f"Bearer {emu.token}")
    assert [p[1] for p in parts] == [404, 404]
    assert all(p[2]["error"]["errors"][0]["reason"] == "notFound" for p in parts)
    # faults injected for an API method hit it inside a batch too
    emu.world.inject_fault("zones.list", "error503")
    ctype, _, body = apitools_batch(emu, [f"projects/{emu.project}/zones", f"projects/{emu.project}/zones"])
    assert [p[1] for p in post(ctype, body, Authorization=f"Bearer {emu.token}")] == [503, 200]


@pytest.mark.parametrize(("ctype", "body"), [
    (None, b""),
    ("application/json", b"{}"),
    ("multipart/mixed", b"--x\r\n\r\nGET / HTTP/1.1\r\n--x--"),          # no boundary
    ("multipart/mixed; boundary=x", b""),                                 # no parts
    ("multipart/mixed; boundary=x", b"--x\r\nContent-Type: application/http\r\n\r\nnot a request line\r\n--x--"),
    ("multipart/mixed; boundary=x", b"--x\r\nContent-Type: application/http\r\n\r\nGET relative HTTP/1.1\r\n--x--"),
])
def test_a_malformed_batch_is_a_400(emu, ctype, body):  # noqa: F811
    headers = {"Authorization": f"Bearer {emu.token}", **({"Content-Type": ctype} if ctype else {})}
    resp = requests.post(f"{emu.endpoint}/batch/compute/v1", data=body, headers=headers, timeout=30)
    assert assert_error(resp, 400, "badRequest")["status"] == "INVALID_ARGUMENT"
    assert requests.get(f"{emu.endpoint}/batch/compute/v1", headers=headers, timeout=30).status_code == 405


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), max_size=4),
       boundary=st.sampled_from(["x", "batch_abc", "=="]))
def test_a_batch_never_answers_5xx(emu, parts, boundary):  # noqa: F811
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/http\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    resp = requests.post(f"{emu.endpoint}/batch/compute/v1", data=body, timeout=30,
                         headers={"Authorization": f"Bearer {emu.token}",
                                  "Content-Type": f'multipart/mixed; boundary="{boundary}"'})
    assert resp.status_code in (200, 400), resp.text[:300]
    if resp.status_code == 200:
        assert all(status < 500 for _, status, _ in parse_batch_answer(resp))


def test_google_cloud_compute_reads_back_what_an_image_family_view_made(emu, clients):  # noqa: F811
    body = compute_v1.Instance(
        name="vm-view", machine_type=f"zones/{ZONE}/machineTypes/e2-small",
        disks=[compute_v1.AttachedDisk(
            boot=True, auto_delete=True, initialize_params=compute_v1.AttachedDiskInitializeParams(
                source_image=f"{GOOGLE}projects/{UBUNTU}/zones/-/imageFamilyViews/{FAMILY}"))],
        network_interfaces=[compute_v1.NetworkInterface(
            network=f"{WWW}projects/{emu.project}/global/networks/default")])
    op = clients.InstancesClient.insert_unary(project=emu.project, zone=ZONE, instance_resource=body)
    clients.ZoneOperationsClient.wait(project=emu.project, zone=ZONE, operation=op.name)
    inst = clients.InstancesClient.get(project=emu.project, zone=ZONE, instance="vm-view")
    assert inst.disks[0].boot and inst.machine_type.endswith("/machineTypes/e2-small")
