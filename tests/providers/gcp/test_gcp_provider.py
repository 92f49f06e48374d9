"""The GCP adapter against the emulated Compute Engine: real google-cloud-compute clients, real HTTP."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labctl import sites
from labctl.engine import Engine
from labctl.errors import CredentialsError, NoCapacity, QuotaExceeded, Transient, UserError
from labctl.plan import build_plan
from labctl.profile import Profile, find_profile, load_profile
from labctl.providers import gcp
from labctl.providers.base import Found
from labctl.state import StateStore

REGION = "us-central1"


def public_key(tmp_path: Path) -> str:
    try:
        from labctl.keys import ensure_keypair
    except ImportError:  # pragma: no cover - keys.py is part of labctl today
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pub = Ed25519PrivateKey.generate().public_key()
        return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return ensure_keypair(tmp_path / "keys").public_key


def profile(name: str, count: int = 1, types: list[str] | None = None, floating_ip: bool = True,
            gpu: dict | None = None, ports: list | None = None) -> Profile:
    group: dict = {"count": count, "floating_ip": floating_ip, "types": {"gcp": types or ["e2-small"]}}
    if gpu:
        group["gpu"] = gpu
    return Profile.model_validate({"name": name, "description": "test", "sites": ["gcp"], "lease_hours": 1,
                                   "image": "ubuntu-24.04", "nodes": {"node": group},
                                   "ports": ports if ports is not None else [22]})


@pytest.fixture
def sim_site():
    return sites.resolve("sim-gcp")


@pytest.fixture
def region_site():
    return sites.emulate(sites.resolve(f"gcp:{REGION}"))


def provider_for(site, testbed) -> gcp.GcpProvider:
    provider = gcp.connect(site, testbed=lambda: testbed)
    provider.call_timeout = 5.0
    return provider


def deployment_items(emu, deployment: str) -> dict[str, list]:
    inv = emu.world.inventory()
    return {
        "instances": [i for i in inv["instances"] if i["labels"].get("labctl-deployment") == deployment],
        "firewalls": [f for f in inv["firewalls"] if deployment in f["description"] or f["name"] == deployment],
        "addresses": [a for a in inv["addresses"] if a["labels"].get("labctl-deployment") == deployment],
    }


def test_import_does_not_load_the_sdk():
    code = ("import sys, labctl.providers.gcp\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('google.cloud', 'google.api_core')))\n"
            "print(loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_connect_to_the_emulated_site(sim_site, testbed, emu):
    provider = gcp.connect(sim_site, testbed=lambda: testbed)
    assert testbed.calls == 1
    assert provider.project == "sim-project" and provider.endpoint == emu.endpoint
    assert provider.site.ssh_port == emu.world.ssh_port and provider.site.zone == "us-central1-a"
    with pytest.raises(UserError, match="no testbed"):
        gcp.connect(sim_site)


def test_missing_credentials_are_one_line(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("GOOGLE_", "CLOUDSDK_", "GCLOUD_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    # do not probe the metadata server (the variable is read when google.auth is imported: set both)
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setattr("google.auth.compute_engine._metadata._NO_GCE_CHECK", True, raising=False)
    with pytest.raises(CredentialsError) as err:
        gcp.connect(sites.resolve("gcp:us-central1-a"))
    assert str(err.value) == gcp.NO_CREDENTIALS
    # gcloud's own file, there but broken: not "log in" alone, but which file and what is wrong with it
    adc = tmp_path / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir()
    adc.write_text('{"type": "authorized_user", "client_id": "x"')
    with pytest.raises(CredentialsError) as err:
        gcp.connect(sites.resolve("gcp:us-central1-a"))
    assert str(err.value) == (f"Google application default credentials: File {adc} is not a valid json file: "
                              "JSONDecodeError: Expecting ',' delimiter: line 1 column 45 (char 44); run 'gcloud auth "
                              "application-default login'")
    adc.unlink()
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(CredentialsError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        gcp.connect(sites.resolve("gcp:us-central1-a"))
    # a broken key file: google-auth's (message, cause) error reads as one sentence, not a tuple's repr
    broken = tmp_path / "key.json"
    broken.write_text('{"type": "service_account", "private_key": "x"')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(broken))
    with pytest.raises(CredentialsError) as err:
        gcp.connect(sites.resolve("gcp:us-central1-a"))
    assert str(err.value) == (f"GOOGLE_APPLICATION_CREDENTIALS: File {broken} is not a valid json file: "
                              "JSONDecodeError: Expecting ',' delimiter: line 1 column 47 (char 46)")
    broken.write_text('{"type": "service_account", "private_key": "not-a-key", "client_email": "a@b.c", '
                      '"token_uri": "https://oauth2.googleapis.com/token", "project_id": "p"}')
    with pytest.raises(CredentialsError) as err:
        gcp.connect(sites.resolve("gcp:us-central1-a"))
    message = str(err.value)
    assert message.startswith(f"GOOGLE_APPLICATION_CREDENTIALS: Failed to load service account credentials from "
                              f"{broken}: ValueError: ") and "not-a-key" not in message and "\n" not in message


def test_type_names():
    assert gcp.parse_type("n1-standard-4+t4") == ("n1-standard-4", "nvidia-tesla-t4", 1)
    assert gcp.parse_type("n1-standard-8+2xv100") == ("n1-standard-8", "nvidia-tesla-v100", 2)
    assert gcp.parse_type("g2-standard-4") == ("g2-standard-4", None, 0)
    assert gcp.gce_name("labctl-" + "x" * 80).startswith("labctl-") and len(gcp.gce_name("labctl-" + "x" * 80)) <= 63


def test_engine_apply_and_destroy_hello(tmp_path, sim_site, testbed, emu):
    plan = build_plan(load_profile(find_profile("hello")), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    store = StateStore(tmp_path / "state.db")
    engine = Engine(provider, store)
    provider.preflight(plan)
    found = engine.apply(plan)

    server = found["server:node-1"]
    assert server.status == "ready" and server.attrs["server_status"] == "RUNNING"
    assert server.attrs["zone"] == "us-central1-a" and server.attrs["node_type"] == "e2-small"
    assert server.attrs["floating_ip"].startswith("127.30.") and server.attrs["fixed_ip"].startswith("10.")
    fip = found["floating_ip:node-1"]
    assert fip.attrs["floating_ip"] == server.attrs["floating_ip"]  # the ephemeral address, promoted
    mine = deployment_items(emu, plan.deployment)
    assert [a["status"] for a in mine["addresses"]] == ["IN_USE"]
    assert len(mine["instances"]) == 1 and mine["instances"][0]["status"] == "RUNNING"
    inst = mine["instances"][0]
    assert inst["labels"] == {"labctl-deployment": plan.deployment, "labctl-lab": "hello",
                              "labctl-owner": "student1", "labctl-node": "node-1"}
    assert inst["tags"] == [plan.deployment] and mine["firewalls"][0]["target_tags"] == [plan.deployment]
    assert mine["firewalls"][0]["allowed"] == [{"IPProtocol": "tcp", "ports": ["22"]}]
    target = next(t for t in emu.world.ssh_targets() if t["name"] == inst["name"])
    assert target["address"] == server.attrs["floating_ip"] and target["user"] == sim_site.ssh_user
    assert target["authorized_keys"] == [plan.get("keypair").spec["public_key"]]

    # a second apply finds everything and creates nothing
    emu.world.clear_request_log()
    again = engine.apply(plan)
    assert again["server:node-1"].cloud_id == server.cloud_id
    assert not [r for r in emu.world.request_log() if r[0] in ("POST", "DELETE", "PATCH")]

    left = engine.destroy(plan)
    assert left == []
    assert deployment_items(emu, plan.deployment) == {"instances": [], "firewalls": [], "addresses": []}
    assert emu.world.inventory() == {"instances": [], "firewalls": [], "addresses": []}


def test_wait_lists_once_per_poll_round(tmp_path, sim_site, testbed, emu):
    plan = build_plan(profile("four", count=4, floating_ip=False), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    emu.world.set_time_scale(0.02)  # instances take 0.4 s to be RUNNING: several poll rounds
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None),
            "secgroup": provider.create(plan.get("secgroup"), plan, {}, None)}
    servers = plan.by_kind("server")
    items = [(r, provider.create(r, plan, deps, "e2-small")) for r in servers]
    assert all(f.status == "pending" for _, f in items)
    emu.world.clear_request_log()
    provider.poll_interval = 0.05
    rounds = []
    real_list = provider.list_instances

    def counting(*args, **kwargs):
        rounds.append(args)
        return real_list(*args, **kwargs)

    provider.list_instances = counting
    progress = []
    done = provider.wait(items, plan, 60, lambda *a: progress.append(a))
    assert [f.status for f in done] == ["ready"] * 4
    log = emu.world.request_log(detail=True)
    lists = [r for r in log if r["operation"] == "instances.list"]
    assert len(log) == len(lists)  # nothing but one list per round: no per-node get
    assert len(lists) == len(rounds) >= 2
    assert all("labctl-deployment" in r["query"] for r in lists)
    assert {p[0] for p in progress} == {f"node-{i}" for i in range(1, 5)}
    assert [p[1] for p in progress].count("booted") == 4
    print(f"\nwait: {len(rounds)} poll rounds, {len(lists)} instances.list calls, {len(log)} requests in all "
          "for 4 nodes")


def test_deployments_waiting_at_once_share_one_list_per_round(tmp_path, sim_site, testbed, emu):
    """Class mode: one adapter per site, many deployments polling at once; one instance list per poll round for
    all of them (fetched after each wait began), not one per deployment."""
    import threading

    provider = provider_for(sim_site, testbed)
    emu.world.set_time_scale(0.15)  # instances take 3 s to be RUNNING: many poll rounds
    plans = [build_plan(profile(f"share{i}", floating_ip=False), sim_site, f"student{i}", public_key(tmp_path))
             for i in range(3)]
    waits: list = []

    def launch(plan) -> None:  # all three at once: they are RUNNING at about the same time
        deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None)}
        res = plan.get("server:node-1")
        waits.append((plan, [(res, provider.create(res, plan, deps, "e2-small"))]))

    launching = [threading.Thread(target=launch, args=(plan,)) for plan in plans]
    for t in launching:
        t.start()
    for t in launching:
        t.join()
    emu.world.clear_request_log()
    provider.poll_interval = 0.1
    done: dict[str, list] = {}
    polls: list[tuple] = []  # one progress event per poll of a deployment
    threads = [threading.Thread(target=lambda p=p, i=i: done.update({p.deployment: provider.wait(
        i, p, 60, lambda *a: polls.append(a))})) for p, i in waits]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [done[p.deployment][0].status for p, _ in waits] == ["ready"] * 3
    lists = [r for r in emu.world.request_log(detail=True) if r["operation"] == "instances.list"]
    # each wait's first poll may list anew (a list from before the wait began may predate its instance); then
    # one list per round serves all three (unshared, every poll would be a list)
    assert len(polls) >= 12 and len(lists) <= len(polls) / 2 + 3


def test_rate_limit_applies_to_every_call(sim_site, testbed, emu):
    provider = provider_for(sim_site, testbed)
    provider.set_rate_limit(40)
    start = time.monotonic()
    for i in range(30):
        assert provider.get_instance("us-central1-a", f"missing-{i}") is None
    assert time.monotonic() - start >= (30 - 5) / 40 * 0.95  # a bucket of 5, then 40 per second
    assert len(emu.world.request_log()) == 30


def test_region_site_moves_to_the_next_zone_then_raises_no_capacity(tmp_path, region_site, testbed, emu, caplog):
    plan = build_plan(profile("t4lab", types=["n1-standard-4+t4"], floating_ip=False), region_site, "student1",
                      public_key(tmp_path))
    provider = provider_for(region_site, testbed)
    provider.preflight(plan)
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None),
            "secgroup": provider.create(plan.get("secgroup"), plan, {}, None)}
    res = plan.get("server:node-1")
    for zone in ("us-central1-a", "us-central1-b"):
        emu.world.set_capacity(zone, "nvidia-tesla-t4", 0)
    with caplog.at_level(logging.INFO, logger="labctl.providers.gcp"):
        found = provider.create(res, plan, deps, "n1-standard-4+t4")
    assert found.attrs["zone"] == "us-central1-c" and found.attrs["node_type"] == "n1-standard-4+t4"
    assert "us-central1-a" in caplog.text and "trying us-central1-b" in caplog.text
    inst = deployment_items(emu, plan.deployment)["instances"]
    assert [(i["zone"], i["machine_type"], i["accelerators"]) for i in inst] == [
        ("us-central1-c", "n1-standard-4", [("nvidia-tesla-t4", 1)])]
    provider.delete("server", [found], plan)

    for zone in ("us-central1-c", "us-central1-f"):
        emu.world.set_capacity(zone, "nvidia-tesla-t4", 0)
    with pytest.raises(NoCapacity, match="us-central1-a, us-central1-b, us-central1-c, us-central1-f"):
        provider.create(res, plan, deps, "n1-standard-4+t4")
    assert deployment_items(emu, plan.deployment)["instances"] == []


def test_engine_falls_back_to_the_next_type(tmp_path, region_site, testbed, emu):
    plan = build_plan(profile("gpulab", types=["n1-standard-4+t4", "g2-standard-4"], floating_ip=True),
                      region_site, "student1", public_key(tmp_path))
    for zone in ("us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"):
        emu.world.set_capacity(zone, "nvidia-tesla-t4", 0)
    emu.world.set_capacity("us-central1-a", "g2-standard-4", 0)
    provider = provider_for(region_site, testbed)
    engine = Engine(provider, StateStore(tmp_path / "state.db"))
    found = engine.apply(plan)
    server = found["server:node-1"]
    assert server.status == "ready" and server.attrs["node_type"] == "g2-standard-4"
    assert server.attrs["zone"] == "us-central1-b"
    body = deployment_items(emu, plan.deployment)["instances"][0]
    assert body["machine_type"] == "g2-standard-4"
    assert engine.destroy(plan) == []
    assert deployment_items(emu, plan.deployment) == {"instances": [], "firewalls": [], "addresses": []}


def test_quota_errors(tmp_path, region_site, testbed, emu):
    plan = build_plan(profile("quota", types=["n1-standard-4+t4"], floating_ip=False), region_site, "student1",
                      public_key(tmp_path))
    provider = provider_for(region_site, testbed)
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None)}
    res = plan.get("server:node-1")
    emu.world.set_quota(REGION, "NVIDIA_T4_GPUS", 0)
    emu.world.clear_request_log()
    with pytest.raises(NoCapacity, match="NVIDIA_T4_GPUS"):  # a type-specific quota: the engine tries the next type
        provider.create(res, plan, deps, "n1-standard-4+t4")
    inserts = [r for r in emu.world.request_log() if r[0] == "POST" and r[1].endswith("/instances")]
    assert len(inserts) == 1  # a regional quota is the same in every zone: no point trying them
    emu.world.set_quota(REGION, "CPUS", 2)
    with pytest.raises(QuotaExceeded, match="CPUS"):
        provider.create(res, plan, deps, "e2-standard-4")


def test_insert_timeout_after_the_server_made_it_gives_one_instance(tmp_path, sim_site, testbed, emu):
    plan = build_plan(profile("retry", floating_ip=False), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None)}
    emu.world.inject_fault("instances.insert", "timeout_after", 1)
    found = provider.create(plan.get("server:node-1"), plan, deps, "e2-small")
    assert found.status == "pending"
    inserts = [r for r in emu.world.request_log(detail=True) if r["operation"] == "instances.insert"]
    assert len(inserts) == 2 and inserts[0]["query"] == inserts[1]["query"]  # the same requestId twice
    assert len(deployment_items(emu, plan.deployment)["instances"]) == 1

    # hang_after: the client gives up after its own timeout, retries with the same requestId
    provider.call_timeout = 0.5
    plan2 = build_plan(profile("hang", floating_ip=False), sim_site, "student1", public_key(tmp_path))
    emu.world.inject_fault("instances.insert", "hang_after", 1)
    provider.create(plan2.get("server:node-1"), plan2, deps, "e2-small")
    assert len(deployment_items(emu, plan2.deployment)["instances"]) == 1


def test_a_rerun_does_not_replay_an_old_failed_operation(tmp_path, sim_site, testbed, emu):
    """Same deployment, node, type and zone in a new process: the requestId repeats, and the emulator answers
    with the old (failed) operation; the adapter notices and launches anew once there is capacity."""
    plan = build_plan(profile("rerun", floating_ip=False), sim_site, "student1", public_key(tmp_path))
    res = plan.get("server:node-1")
    first = provider_for(sim_site, testbed)
    deps = {"keypair": first.create(plan.get("keypair"), plan, {}, None)}
    emu.world.set_capacity("us-central1-a", "e2-small", 0)
    with pytest.raises(NoCapacity):
        first.create(res, plan, deps, "e2-small")
    emu.world.set_capacity("us-central1-a", "e2-small", 10)
    second = provider_for(sim_site, testbed)  # a new labctl process: attempt counters start again
    found = second.create(res, plan, deps, "e2-small")
    assert found.status == "pending"
    assert len(deployment_items(emu, plan.deployment)["instances"]) == 1


def test_transient_errors_are_retried_and_translated(tmp_path, sim_site, testbed, emu):
    plan = build_plan(profile("flaky", floating_ip=False), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    emu.world.inject_fault("instances.list", "error503", 2)
    assert provider.find(plan.get("server:node-1"), plan) is None  # third try answers
    emu.world.inject_fault("instances.list", "error429", 1)
    assert provider.list_owned(plan) == []
    provider.call_retries = 2
    emu.world.inject_fault("instances.list", "error503", 5)
    with pytest.raises(Transient, match="503"):
        provider.find(plan.get("server:node-1"), plan)
    emu.world.clear_faults()
    bad = dataclasses.replace(sim_site, zone="europe-west4-a")
    with pytest.raises(UserError, match="not in region"):
        gcp.GcpProvider(bad, emu.project, credentials=emu.credentials(), endpoint=emu.endpoint).preflight(plan)
    zone_b = sites.emulate(sites.resolve("gcp:us-central1-b"))
    b_provider = provider_for(zone_b, testbed)
    typo = build_plan(profile("typo", types=["e2-smal"]), zone_b, "student1", public_key(tmp_path))
    with pytest.raises(UserError, match="none of e2-smal .* is offered in us-central1-b"):
        b_provider.preflight(typo)
    ultra = build_plan(profile("ultra", types=["a2-ultragpu-1g", "e2-small"]), zone_b, "student1",
                       public_key(tmp_path))
    b_provider.preflight(ultra)  # one candidate is offered: fine (the other is skipped with a warning)
    with pytest.raises(NoCapacity, match="a2-ultragpu-1g is not offered in us-central1-b"):
        b_provider.create(ultra.get("server:node-1"), ultra, {}, "a2-ultragpu-1g")
    rocm = build_plan(profile("rocm", floating_ip=False).model_copy(update={"image": "ubuntu-24.04-rocm"}),
                      sim_site, "student1", public_key(tmp_path))
    with pytest.raises(UserError, match="no Compute Engine image for 'ubuntu-24.04-rocm'"):
        provider.preflight(rocm)


def test_secgroup_rules_per_source_range_and_repair(tmp_path, sim_site, testbed, emu):
    ports = [22, {"port": 8888, "cidr": "10.0.0.0/8"}, {"port": 9000, "protocol": "udp", "cidr": "10.0.0.0/8"}]
    plan = build_plan(profile("fw", ports=ports), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    res = plan.get("secgroup")
    assert provider.find(res, plan) is None
    found = provider.create(res, plan, {}, None)
    assert found.status == "ready" and found.cloud_id == f"global/firewalls/{plan.deployment}"
    fws = {f["name"]: f for f in emu.world.inventory()["firewalls"]}
    assert len(fws) == 2
    assert fws[plan.deployment]["source_ranges"] == ["0.0.0.0/0"]
    other = next(f for n, f in fws.items() if n != plan.deployment)
    assert other["source_ranges"] == ["10.0.0.0/8"]
    assert sorted(a["IPProtocol"] for a in other["allowed"]) == ["tcp", "udp"]
    assert provider.find(res, plan).status == "ready"
    # someone narrows a rule by hand: find says incomplete, create repairs it
    narrowed = dataclasses.replace(res, spec={"rules": [*res.spec["rules"], {"port": 443, "protocol": "tcp",
                                                                             "cidr": "0.0.0.0/0"}]})
    assert provider.find(narrowed, plan).status == "incomplete"
    provider.create(narrowed, plan, {}, None)
    assert provider.find(narrowed, plan).status == "ready"
    owned = [f for f in provider.list_owned(plan) if f.kind == "secgroup"]
    assert len(owned) == 2
    provider.delete("secgroup", [Found("secgroup", found.cloud_id, res.name)], plan)
    assert len(emu.world.inventory()["firewalls"]) == 1  # the recorded one; destroy also deletes list_owned's
    provider.delete("secgroup", owned, plan)
    assert emu.world.inventory()["firewalls"] == []


def test_static_address_survives_a_relaunch_and_down_after_a_crash(tmp_path, sim_site, testbed, emu):
    """A server re-created after an error gets its node's static address; `down` with only the state records
    (no attrs) and the deployment's labels deletes everything."""
    plan = build_plan(profile("fip"), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    store = StateStore(tmp_path / "state.db")
    found = Engine(provider, store).apply(plan)
    ip = found["floating_ip:node-1"].attrs["floating_ip"]
    provider.delete("server", [found["server:node-1"]], plan)
    assert [a["status"] for a in emu.world.inventory()["addresses"]] == ["RESERVED"]
    relaunched = provider.create(plan.get("server:node-1"), plan, found, "e2-small")
    [ready] = provider.wait([(plan.get("server:node-1"), relaunched)], plan, 30, lambda *a: None)
    assert ready.attrs["floating_ip"] == ip
    assert provider.find(plan.get("floating_ip:node-1"), plan).status == "ready"
    with pytest.raises(UserError, match="only while the instance is stopped"):  # setScheduling: TERMINATED only
        provider.extend(ready, 2, plan)

    # `labctl down` builds Found(kind, cloud_id, name) from the records only
    from labctl.plan import Plan, Resource

    bare = Plan(plan.deployment, plan.lab, plan.owner, None, provider.site, 0, {}, [])
    for rec in store.resources(plan.deployment):
        bare.resources.append(Resource(rec.key, rec.kind, rec.name, {"node": rec.key.split(":")[-1]}))
    assert Engine(provider, store).destroy(bare) == []
    assert emu.world.inventory() == {"instances": [], "firewalls": [], "addresses": []}


def test_engine_four_nodes_in_parallel(tmp_path, region_site, testbed, emu):
    """The engine launches the nodes concurrently (one adapter, shared clients); every node ends RUNNING with
    its own external 127.30.x.y address, and destroy leaves nothing labelled with the deployment."""
    plan = build_plan(profile("four", count=4, ports=[22, 8888]), region_site, "student1", public_key(tmp_path))
    provider = provider_for(region_site, testbed)
    engine = Engine(provider, StateStore(tmp_path / "state.db"))
    provider.preflight(plan)
    found = engine.apply(plan)
    servers = [found[f"server:node-{i}"] for i in range(1, 5)]
    assert {s.status for s in servers} == {"ready"}
    ips = [s.attrs["floating_ip"] for s in servers]
    assert len(set(ips)) == 4 and all(ip.startswith("127.30.") for ip in ips)
    assert [found[f"floating_ip:node-{i}"].attrs["floating_ip"] for i in range(1, 5)] == ips
    mine = deployment_items(emu, plan.deployment)
    assert sorted(i["status"] for i in mine["instances"]) == ["RUNNING"] * 4
    assert len(mine["addresses"]) == 4 and {a["status"] for a in mine["addresses"]} == {"IN_USE"}
    assert engine.destroy(plan) == []
    assert deployment_items(emu, plan.deployment) == {"instances": [], "firewalls": [], "addresses": []}
