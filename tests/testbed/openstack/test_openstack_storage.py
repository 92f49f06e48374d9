"""The emulated Cinder (volumes), Nova's os-volume_attachments and Swift, driven by openstacksdk over HTTP."""

from __future__ import annotations

import time

import pytest
import requests
from tests.testbed.openstack.test_openstack_api import active_lease, blazar, connect


def _server(conn, name: str = "lab-node-1"):
    bz = blazar(conn, "KVM@TACC")
    large = conn.compute.find_flavor("m1.large", ignore_missing=False)
    lease = active_lease(bz, name, [{"resource_type": "flavor:instance", "flavor_id": large.id, "amount": 1,
                                     "affinity": None}])
    shared = conn.network.find_network("sharednet1", ignore_missing=False)
    image = next(conn.image.images(name="CC-Ubuntu24.04"))
    server = conn.compute.create_server(name=name, image_id=image.id, flavor_id=lease["reservations"][0]["flavor_id"],
                                        networks=[{"uuid": shared.id}])
    return conn.compute.wait_for_server(server, status="ACTIVE", interval=0.02, wait=10)


def test_catalog_has_block_storage_only_at_kvm(tb):
    kvm = {e["type"] for e in requests.post(f"{tb.auth_url('kvm@tacc')}/auth/tokens", json=_auth(tb)).json()[
        "token"]["catalog"]}
    chi = {e["type"] for e in requests.post(f"{tb.auth_url('chi@tacc')}/auth/tokens", json=_auth(tb)).json()[
        "token"]["catalog"]}
    assert {"block-storage", "volumev3", "object-store"} <= kvm
    assert "object-store" in chi and "block-storage" not in chi and "volumev3" not in chi


def _auth(tb) -> dict:
    creds = tb.world.credentials
    return {"auth": {"identity": {"methods": ["application_credential"], "application_credential": {
        "id": creds.app_cred_id, "secret": creds.app_cred_secret}}}}


def test_volume_lifecycle_and_attachment(tb):
    from openstack import exceptions as os_exc

    conn = connect(tb, "kvm@tacc")
    vol = conn.block_storage.create_volume(size=2, name="lab-block", metadata={"labctl:deployment": "lab"})
    assert vol.status == "creating" and vol.size == 2 and vol.metadata == {"labctl:deployment": "lab"}
    vol = conn.block_storage.wait_for_status(vol, status="available", interval=0.02, wait=10)
    assert [v.id for v in conn.block_storage.volumes(name="lab-block")] == [vol.id]
    assert list(conn.block_storage.volumes(name="other")) == []
    with pytest.raises(os_exc.NotFoundException, match="could not be found"):
        conn.block_storage.get_volume("no-such-volume")
    with pytest.raises(os_exc.BadRequestException):
        conn.block_storage.create_volume(size=0, name="bad")

    server = _server(conn)
    att = conn.compute.create_volume_attachment(server, vol.id)
    assert att.device == "/dev/vdb" and att.volume_id == vol.id
    vol = conn.block_storage.get_volume(vol.id)
    assert vol.status == "in-use"
    assert [(a["server_id"], a["device"]) for a in vol.attachments] == [(server.id, "/dev/vdb")]
    assert [a.volume_id for a in conn.compute.volume_attachments(server)] == [vol.id]
    with pytest.raises(os_exc.BadRequestException, match="current status is in-use"):
        conn.compute.create_volume_attachment(server, vol.id)
    with pytest.raises(os_exc.BadRequestException, match="must be available"):
        conn.block_storage.delete_volume(vol)
    (inv,) = tb.world.inventory("kvm@tacc")["volumes"]
    assert inv["status"] == "in-use" and inv["attachments"] == [{"server_id": server.id, "device": "/dev/vdb"}]

    conn.compute.delete_volume_attachment(server, vol.id)
    assert conn.block_storage.get_volume(vol.id).status == "available"
    with pytest.raises(os_exc.NotFoundException):
        conn.compute.get_volume_attachment(server, vol.id)

    # Deleting a server detaches its volumes, as Nova does.
    conn.compute.create_volume_attachment(server, vol.id)
    conn.compute.delete_server(server)
    assert conn.block_storage.get_volume(vol.id).status == "available"

    conn.block_storage.delete_volume(vol)
    conn.block_storage.wait_for_delete(vol, interval=0.02, wait=10)
    assert "volumes" not in tb.world.inventory("kvm@tacc")


def test_no_block_storage_at_bare_metal_sites(tb):
    conn = connect(tb, "chi@tacc")
    from openstack import exceptions as os_exc

    with pytest.raises((os_exc.EndpointNotFound, os_exc.SDKException)):
        conn.block_storage.create_volume(size=1, name="x")


def test_swift_containers_and_objects(tb):
    from openstack import exceptions as os_exc

    conn = connect(tb, "chi@uc")
    conn.object_store.create_container(name="lab-persist", metadata={"labctl-deployment": "lab"})
    assert [c.name for c in conn.object_store.containers()] == ["lab-persist"]
    meta = conn.object_store.get_container_metadata("lab-persist")
    # openstacksdk keeps a container's metadata in a dict shared across calls, so keys an earlier create in this
    # process sent come along (its bug, not the emulator's): the emulator must store what was sent.
    assert meta.metadata["labctl-deployment"] == "lab"
    conn.object_store.create_object("lab-persist", "hello.txt", data=b"hello")
    assert conn.object_store.download_object("hello.txt", container="lab-persist") == b"hello"
    assert [o.name for o in conn.object_store.objects("lab-persist")] == ["hello.txt"]
    with pytest.raises(os_exc.ConflictException):
        conn.object_store.delete_container("lab-persist", ignore_missing=False)
    (inv,) = tb.world.inventory("chi@uc")["containers"]
    assert inv["name"] == "lab-persist" and inv["objects"] == ["hello.txt"] and inv["bytes"] == 5
    conn.object_store.delete_object("hello.txt", container="lab-persist")
    conn.object_store.delete_container("lab-persist", ignore_missing=False)
    assert list(conn.object_store.containers()) == []
    with pytest.raises(os_exc.NotFoundException):
        conn.object_store.delete_container("lab-persist", ignore_missing=False)
    raw = requests.delete(f"{tb.site_url('chi@uc')}/object-store/v1/AUTH_x/none",
                          headers={"X-Auth-Token": conn.session.get_token()})
    assert raw.status_code == 404 and "<h1>Not Found</h1>" in raw.text
    time.sleep(0)
