"""`labctl.testbed.gce.common.parse_ref`, the one reader of resource references (sourceImage, machineType,
network, subnetwork, disk type and source, accelerator types), on the forms Compute Engine's API reference
documents for them."""

from __future__ import annotations

import pytest

from labctl.testbed.gce.common import ApiError, Ref, parse_ref

P = "sim-project"
Z = "us-central1-a"


@pytest.mark.parametrize(("value", "collections", "kw", "want"), [
    (f"https://compute.googleapis.com/compute/v1/projects/{P}/zones/{Z}/machineTypes/e2-small",
     ("machineTypes",), {}, Ref(P, f"zones/{Z}", "machineTypes", "e2-small")),
    (f"https://www.googleapis.com/compute/v1/projects/{P}/zones/{Z}/machineTypes/e2-small",
     ("machineTypes",), {}, Ref(P, f"zones/{Z}", "machineTypes", "e2-small")),
    (f"http://127.0.0.1:8080/compute/v1/projects/{P}/global/networks/default",
     ("networks",), {}, Ref(P, "global", "networks", "default")),
    (f"https://compute.googleapis.com/compute/beta/projects/{P}/regions/us-central1/subnetworks/s1",
     ("subnetworks",), {}, Ref(P, "regions/us-central1", "subnetworks", "s1")),
    (f"zones/{Z}/machineTypes/n1-standard-1", ("machineTypes",), {}, Ref(P, f"zones/{Z}", "machineTypes",
                                                                          "n1-standard-1")),
    ("e2-small", ("machineTypes",), {"zone": Z, "bare": True}, Ref(P, f"zones/{Z}", "machineTypes", "e2-small")),
    ("default", ("networks",), {"bare": True}, Ref(P, "global", "networks", "default")),
    ("nvidia-tesla-t4", ("acceleratorTypes",), {"zone": Z, "bare": True},
     Ref(P, f"zones/{Z}", "acceleratorTypes", "nvidia-tesla-t4")),
    ("projects/debian-cloud/global/images/debian-12-bookworm-v20250101", ("images", "imageFamilyViews"), {},
     Ref("debian-cloud", "global", "images", "debian-12-bookworm-v20250101")),
    ("projects/debian-cloud/global/images/family/debian-12", ("images", "imageFamilyViews"), {},
     Ref("debian-cloud", "global", "images", "debian-12", family=True)),
    ("global/images/family/my-image-family", ("images", "imageFamilyViews"), {},
     Ref(P, "global", "images", "my-image-family", family=True)),
    ("https://compute.googleapis.com/compute/v1/projects/debian-cloud/zones/-/imageFamilyViews/debian-12",
     ("images", "imageFamilyViews"), {}, Ref("debian-cloud", "zones/-", "imageFamilyViews", "debian-12", True)),
    (f"zones/{Z}/diskTypes/pd-ssd", ("diskTypes",), {}, Ref(P, f"zones/{Z}", "diskTypes", "pd-ssd")),
])
def test_the_documented_forms(value, collections, kw, want):
    ref = parse_ref(value, "resource.x", collections, P, **kw)
    assert ref == want
    assert parse_ref(ref.rel, "resource.x", collections, P) == ref  # the canonical form reads back the same


@pytest.mark.parametrize(("value", "collections", "kw"), [
    (None, ("networks",), {}),
    (42, ("networks",), {}),
    ("", ("networks",), {}),
    ("e2-small", ("machineTypes",), {}),                       # a bare name where none is accepted
    ("e2-small", ("machineTypes",), {"bare": True}),           # ... or where no zone is implied
    ("projects/p1/global/networks/", ("networks",), {}),
    ("projects/p1/global/networks/a/b", ("networks",), {}),
    (f"projects/{P}/zones/{Z}/networks/default", ("networks",), {}),   # a global kind under a zone
    (f"projects/{P}/global/machineTypes/e2-small", ("machineTypes",), {}),
    (f"projects/{P}/global/firewalls/default", ("networks",), {}),      # another kind of resource
    (f"projects/{P}/zones/-/machineTypes/e2-small", ("machineTypes",), {}),  # "-" only in image family views
    ("https://example.com/projects/p1/global/networks/default", ("networks",), {}),
    ("ftp://compute.googleapis.com/compute/v1/projects/p1/global/networks/default", ("networks",), {}),
    ("projects/UPPER/global/networks/default", ("networks",), {}),
    ("projects/p1/global/networks/a b", ("networks",), {}),
])
def test_malformed_references_are_400_invalid(value, collections, kw):
    with pytest.raises(ApiError) as err:
        parse_ref(value, "resource.network", collections, P, **kw)
    assert err.value.status == 400 and err.value.reason == "invalid"
    assert err.value.message.startswith("Invalid value for field 'resource.network'")
