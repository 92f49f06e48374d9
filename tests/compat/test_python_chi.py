"""python-chi as the course's notebooks use it (teaching-on-testbeds: mltrain-chi, hello-chameleon, eval-*-chi),
unmodified, in a real Jupyter kernel, against the emulated Chameleon.

The kernel (ipykernel, as on Chameleon's JupyterHub) gets the environment JupyterHub gives: OS_* credentials for
one site (CHI@UC, so that nothing works at CHI@TACC unless `choose_site` switched to it), the key pair python-chi
uploads (`OS_KEYPAIR_PUBLIC_KEY` / `OS_KEYPAIR_PRIVATE_KEY`) and `CHI_RESOURCE_API_URL`, where python-chi reads
sites.json. Each emulated site has its own loopback address with Keystone on port 5000 there
(`Testbed.start(site_addresses=True)`), the address sites.json gives as `web`, so `use_site` and `choose_site`
(which set the auth URL to `<web>:5000/v3`) work as they do against Chameleon. The cells are the notebooks' own,
with our names; python-chi's polling keeps its own 5 s interval (nothing here speeds it up).

What python-chi does that the emulator cannot fix, and these tests pin (so a python-chi release that changes it
shows up here):
- `use_site("KVM@TACC")` ignores sites.json: python-chi hard-codes https://kvm.tacc.chameleoncloud.org, so the
  KVM flow sets the auth URL the way python-chi's own error message suggests (`chi.set('auth_url', ...)`).
- `Server.submit()` / `Server.wait()` and `Lease.wait()` return normally when the server or lease ends in ERROR
  (their wait loops stop on ERROR without raising): the refusal tests read the status and Nova's fault.
- `Server.delete()` (delete_ips=True) does not release the floating IP: it sends `DELETE <neutron>/v2.0/<id>`
  (openstacksdk's raw HTTP verb), a 404 it ignores; `create_lease` logs Blazar's refusal and returns None, so
  `Lease.submit()` says only "Unable to make lease".
- `check_connectivity()` and `execute()` use port 22 of the floating IP; the emulated nodes listen on the
  testbed's SSH port unless port 22 is served (root), so the cells pass `port=` when it is not 22.
"""

from __future__ import annotations

import ast
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.testbed.openstack import catalog as cat
from labctl.testbed.server import Testbed

pytest.importorskip("chi")
jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

GUARD_DIR = Path(__file__).parents[1] / "loopback_guard"  # the tests' loopback guard (tests/conftest.py)
SCALE = 0.002
CELL_TIMEOUT = 120  # s; python-chi polls every 5 s, so a wait that never ends shows up here, not in 20 min
NO_VALID_HOST = "No valid host was found"
KVM_HARD_CODED = "https://kvm.tacc.chameleoncloud.org:5000/v3"
FIRST_CELL = """
    # run in Chameleon Jupyter environment
    from chi import server, context, lease
    import chi, os, datetime

    context.version = "1.0"
"""


@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """One testbed for the module: every site on its own address, SSH for the nodes."""
    testbed = Testbed.start(tmp_path_factory.mktemp("world"), SCALE, ssh=True, site_addresses=True)
    try:
        assert testbed.site_block is not None, "no 127.40.B.x block had port 5000 free"
        yield testbed
    finally:
        testbed.stop()


class CellError(AssertionError):
    """A cell raised: its exception name, value and traceback, as the notebook would show them."""

    def __init__(self, ename: str, evalue: str, traceback: str, output: str = "") -> None:
        super().__init__(f"{ename}: {evalue}\n{traceback}\n{output}")
        self.ename, self.evalue, self.output = ename, evalue, output


class Notebook:
    """A real Jupyter kernel (ipykernel) that runs cells in order and keeps their state, as a notebook does."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.km, self.kc = jupyter_client.manager.start_new_kernel(
            startup_timeout=60, kernel_name="python3", env=env, cwd=str(cwd))

    def run(self, source: str) -> str:
        """Run one cell; its printed output. Raises CellError when the cell raised."""
        out: list[str] = []
        error: list[CellError] = []

        def hook(msg: dict) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                out.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                error.append(CellError(content["ename"], content["evalue"], "\n".join(content["traceback"])))

        try:
            reply = self.kc.execute_interactive(textwrap.dedent(source), timeout=CELL_TIMEOUT, output_hook=hook)
        except TimeoutError:
            self.km.interrupt_kernel()
            raise AssertionError(f"cell still running after {CELL_TIMEOUT}s:\n{source}\n{''.join(out)}") from None
        if reply["content"]["status"] != "ok":
            if error:
                error[0].output = "".join(out)
                raise error[0]
            raise AssertionError(f"cell failed: {reply['content']}")
        return "".join(out)

    def value(self, expression: str):
        """The value of a Python literal expression in the kernel (ints, strings, lists, dicts...)."""
        reply = self.kc.execute_interactive("", user_expressions={"v": expression}, timeout=CELL_TIMEOUT)
        result = reply["content"]["user_expressions"]["v"]
        if result["status"] != "ok":
            raise CellError(result["ename"], result["evalue"], "\n".join(result["traceback"]))
        return ast.literal_eval(result["data"]["text/plain"])

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def nb(tb: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Notebook]:
    """The course's Jupyter environment: CHI@UC's credentials, the user's key pair, the resource API."""
    home = tmp_path_factory.mktemp("home")
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(ssh / "id_rsa"))
    key.write_public_key(str(ssh / "id_rsa.pub"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "AWS_", "GOOGLE_", "CHI_"))}
    env.update(tb.os_env("chi@uc"))
    env.update(
        HOME=str(home), USER="student", CHI_RESOURCE_API_URL=tb.refapi_url,
        OS_KEYPAIR_PRIVATE_KEY=str(ssh / "id_rsa"), OS_KEYPAIR_PUBLIC_KEY=str(ssh / "id_rsa.pub"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / ".ipython"),
        MPLCONFIGDIR=str(home / ".mpl"), PYDEVD_DISABLE_FILE_VALIDATION="1",
        PYTHONPATH=os.pathsep.join([str(GUARD_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    notebook = Notebook(env, home)
    try:
        assert notebook.value("__import__('sys').executable") == sys.executable
        notebook.run(FIRST_CELL)
        yield notebook
    finally:
        notebook.close()


def ssh_port_args(tb: Testbed) -> str:
    """`port=...` for check_connectivity/execute while the nodes do not answer on port 22 (see the docstring)."""
    return "" if tb.ssh_port == 22 else f"port={tb.ssh_port}"


def empty(tb: Testbed, site: str) -> dict:
    inv = tb.world.inventory(site)
    return {k: v for k, v in inv.items() if v}


# ============================================================================ sites


def test_choose_site_reads_sites_json_and_authenticates_at_port_5000_of_the_site(nb: Notebook, tb: Testbed):
    out = nb.run("""
        context.choose_project()
        context.choose_site(default="CHI@TACC")
    """)
    assert "Now using CHI@TACC" in out and f"URL: {tb.site_web('chi@tacc')}" in out
    assert nb.value("chi.get('auth_url')") == tb.auth_url("chi@tacc") == f"{tb.site_web('chi@tacc')}:5000/v3"
    assert nb.value("chi.get('region_name')") == "CHI@TACC"
    assert nb.value("chi.get('project_name')") == cat.PROJECT_NAME  # choose_project took the user's only project
    # The session really talks to CHI@TACC's Keystone: its catalog is CHI@TACC's (Nova at its prefix).
    nova = nb.value("chi.session().get_endpoint(service_type='compute', interface='public')")
    assert nova == f"{tb.site_url('chi@tacc')}/compute/v2.1"

    nb.run('context.use_site("CHI@UC")')
    assert nb.value("chi.get('auth_url')") == tb.auth_url("chi@uc")
    assert nb.value("[f.name for f in server.list_flavors()]") == ["baremetal"]


def test_use_site_of_kvm_at_tacc_is_built_into_python_chi(nb: Notebook, tb: Testbed):
    """python-chi's own: KVM@TACC's URL does not come from sites.json. The testbed serves KVM@TACC's Keystone
    at its own address all the same, for `chi.set('auth_url', ...)`."""
    nb.run('context.use_site("KVM@TACC")')
    assert nb.value("chi.get('auth_url')") == KVM_HARD_CODED
    nb.run(f"chi.set('auth_url', '{tb.auth_url('kvm@tacc')}')")
    assert "m1.small" in nb.value("[f.name for f in server.list_flavors()]")


def test_keystone_at_port_5000_serves_only_keystone(tb: Testbed):
    import requests

    web = tb.site_web("chi@tacc")
    versions = requests.get(f"{web}:5000/", timeout=10)
    assert versions.status_code == 300 and versions.json()["versions"]["values"][0]["id"] == "v3.14"
    assert requests.get(f"{web}:5000/v3", timeout=10).json()["version"]["status"] == "stable"
    nova_there = requests.get(f"{web}:5000/compute/v2.1/servers", timeout=10)
    assert nova_there.status_code == 404 and nova_there.json()["error"]["code"] == 404
    wrong = {"auth": {"identity": {"methods": ["application_credential"], "application_credential": {
        "id": tb.world.credentials.app_cred_id, "secret": "not-the-secret"}}}}
    refused = requests.post(f"{web}:5000/v3/auth/tokens", json=wrong, timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["title"] == "Unauthorized"
    sites = requests.get(f"{tb.refapi_url}/sites.json", timeout=10).json()["items"]
    assert {s["name"]: s["web"] for s in sites} == {
        "CHI@TACC": tb.site_web("chi@tacc"), "CHI@UC": tb.site_web("chi@uc"), "CHI@Edge": tb.site_web("chi@edge")}


# ============================================================================ whole flows


@pytest.mark.slow
def test_bare_metal_lease_server_floating_ip_ssh_and_delete_at_chi_tacc(nb: Notebook, tb: Testbed):
    nb.run("""
        context.choose_site(default="CHI@TACC")
        username = os.getenv('USER')
    """)
    # Reserve a node by type plus a floating IP, and wait for the lease to start (python-chi's docs and the
    # course's bare-metal labs).
    nb.run("""
        l = lease.Lease(f"mltrain-{username}", duration=datetime.timedelta(hours=3))
        l.add_node_reservation(node_type="compute_liqid", amount=1)
        l.add_fip_reservation(amount=1)
        l.submit(idempotent=True, wait_for_active=True)
        l.show()
    """)
    assert nb.value("l.status") == "ACTIVE"
    lease_id = nb.value("l.id")
    (held,) = [x for x in tb.world.inventory("chi@tacc")["leases"] if x["id"] == lease_id]
    assert held["name"] == "mltrain-student"
    assert empty(tb, "chi@uc") == {}  # use_site switched: nothing went to the site of the environment's openrc
    # The notebook's next session finds the lease by name (mltrain-chi's create_server).
    assert nb.value("lease.get_lease('mltrain-student').id") == lease_id

    # mltrain-chi's create_server_nvidia, cell by cell
    nb.run("""
        s = server.Server(
            f"node-mltrain-{username}",
            reservation_id=l.node_reservations[0]["id"],
            image_name="CC-Ubuntu24.04-CUDA"
        )
        s.submit(idempotent=True)
    """)
    assert nb.value("s.status") == "ACTIVE"
    assert nb.value("s.keypair.name") == "student-jupyter"  # python-chi uploaded the Jupyter key
    (fip,) = nb.value("l.get_reserved_floating_ips()")
    nb.run("s.associate_floating_ip(l.get_reserved_floating_ips()[0])")
    out = nb.run(f"""
        s.refresh()
        s.check_connectivity({ssh_port_args(tb)})
    """)
    assert f"Checking connectivity to {fip}" in out and "Connection successful" in out
    assert nb.value("s.get_floating_ip()") == fip
    ran = nb.run(f"r = s.execute('echo hello from $USER', {ssh_port_args(tb)})")
    assert "hello from" in ran and nb.value("r.exited") == 0

    (node,) = tb.world.inventory("chi@tacc")["servers"]
    assert node["name"] == "node-mltrain-student" and node["status"] == "ACTIVE"

    # the course's delete notebook
    nb.run("""
        s.delete()
        l.delete()
    """)
    nb.run("chi.server.nova().keypairs.delete('student-jupyter')")
    assert empty(tb, "chi@tacc") == {}


@pytest.mark.slow
def test_kvm_flavor_lease_server_security_groups_and_delete(nb: Notebook, tb: Testbed):
    nb.run(f"""
        from chi import network
        context.choose_site(default="KVM@TACC")
        chi.set('auth_url', '{tb.auth_url('kvm@tacc')}')  # python-chi's KVM@TACC URL is built in (see above)
        username = os.getenv('USER')
    """)
    # hello-chameleon / eval-*-chi: a flavor reservation, then a server of the reserved flavor
    nb.run("""
        l = lease.Lease(f"lease-serve-{username}", duration=datetime.timedelta(hours=6))
        l.add_flavor_reservation(id=chi.server.get_flavor_id("m1.medium"), amount=1)
        l.submit(idempotent=True)
        l.show()
    """)
    assert nb.value("l.status") == "ACTIVE"
    reserved = nb.value("l.get_reserved_flavors()[0].name")
    assert reserved.startswith("reservation:")  # Blazar's private flavor, as on KVM@TACC
    nb.run("""
        s = server.Server(
            f"node-serve-{username}",
            image_name="CC-Ubuntu24.04",
            flavor_name=l.get_reserved_flavors()[0].name
        )
        s.submit(idempotent=True)
        s.associate_floating_ip()
        s.refresh()
    """)
    assert nb.value("s.status") == "ACTIVE"
    fip = nb.value("s.get_floating_ip()")
    assert fip and fip.startswith(f"127.10.{cat.resolve_site('kvm@tacc').number}.")

    # Only `default`: KVM@TACC admits no SSH from outside, so python-chi's execute is refused.
    with pytest.raises(CellError) as refused:
        nb.run(f"s.execute('true', {ssh_port_args(tb)})")
    assert refused.value.ename in ("SSHException", "NoValidConnectionsError", "EOFError",
                                   "ConnectionResetError"), refused.value

    # The course's security-group cell
    out = nb.run("""
        security_groups = [
          {'name': "allow-ssh", 'port': 22, 'description': "Enable SSH traffic on TCP port 22"},
          {'name': "allow-8888", 'port': 8888, 'description': "Enable TCP port 8888 (used by Jupyter)"}
        ]
        # configure openstacksdk for actions unsupported by python-chi
        os_conn = chi.clients.connection()
        nova_server = chi.nova().servers.get(s.id)

        for sg in security_groups:

          if not os_conn.get_security_group(sg['name']):
              os_conn.create_security_group(sg['name'], sg['description'])
              os_conn.create_security_group_rule(sg['name'], port_range_min=sg['port'], port_range_max=sg['port'],
                                                 protocol='tcp', remote_ip_prefix='0.0.0.0/0')

          nova_server.add_security_group(sg['name'])

        print(f"updated security groups: {[group.name for group in nova_server.list_security_group()]}")
    """)
    assert "updated security groups: ['default', 'allow-ssh', 'allow-8888']" in out
    out = nb.run(f"s.check_connectivity({ssh_port_args(tb)})")
    assert "Connection successful" in out
    assert "ok" in nb.run(f"r = s.execute('echo ok', {ssh_port_args(tb)})") and nb.value("r.exited") == 0

    nb.run("""
        reserved_fip = s.get_floating_ip()
        s.delete()
    """)
    # python-chi's own: Server.delete(delete_ips=True) sends `DELETE <neutron>/v2.0/<fip id>` (openstacksdk's
    # raw HTTP verb, not delete_ip), which Neutron answers 404, quietly; the address stays allocated.
    assert [f["floating_ip_address"] for f in tb.world.inventory("kvm@tacc")["floating_ips"]] == [fip]
    nb.run("""
        # hello-chameleon's delete cell
        ip_details = chi.network.get_floating_ip(reserved_fip)
        chi.neutron().delete_floatingip(ip_details["id"])
        l.delete()
        for sg in security_groups:
            os_conn.delete_security_group(sg['name'])
        chi.server.nova().keypairs.delete('student-jupyter')
    """)
    assert empty(tb, "kvm@tacc") == {}


# ============================================================================ refusals, as Chameleon gives them


@pytest.mark.slow
def test_a_server_on_a_reservation_that_is_not_one_ends_in_error_with_novas_fault(nb: Notebook, tb: Testbed):
    """The classic trap: the lease's id instead of its reservation's. Nova accepts the request (202) and the
    server ends in ERROR with the scheduler's fault; python-chi's submit returns all the same (its bug)."""
    nb.run("""
        context.choose_site(default="CHI@TACC")
        l = lease.Lease("trap-student", duration=datetime.timedelta(hours=1))
        l.add_node_reservation(node_type="compute_cascadelake", amount=1)
        l.submit(idempotent=True, wait_for_active=True)
        s = server.Server("trap-node-student", reservation_id=l.id, image_name="CC-Ubuntu24.04")
        s.submit(idempotent=True)
    """)
    assert nb.value("s.status") == "ERROR"
    assert nb.value("chi.nova().servers.get(s.id).fault['message']").startswith(NO_VALID_HOST)
    assert nb.value("chi.nova().servers.get(s.id).fault['code']") == 500
    nb.run("""
        s.delete()
        l.delete()
        chi.server.nova().keypairs.delete('student-jupyter')
    """)
    assert empty(tb, "chi@tacc") == {}


def test_a_lease_for_more_nodes_than_the_site_has_is_refused_by_blazar(nb: Notebook, tb: Testbed):
    nb.run('context.choose_site(default="CHI@TACC")')
    hosts = sum(1 for h in cat.hosts(cat.resolve_site("chi@tacc")) if h.node_type == "compute_liqid")
    with pytest.raises(CellError) as refused:
        nb.run(f"""
            l = lease.Lease("too-big-student", duration=datetime.timedelta(hours=1))
            l.add_node_reservation(node_type="compute_liqid", amount={hosts + 1})
            l.submit(idempotent=True)
        """)
    # python-chi's create_lease logs Blazar's answer and returns None; submit then raises its own error
    assert (refused.value.ename, refused.value.evalue) == ("ResourceError", "Unable to make lease")
    assert "not enough hosts available" in refused.value.output.lower(), refused.value.output
    assert empty(tb, "chi@tacc") == {}
