"""Nova: key pairs and servers (on a lease's reservation or a plain flavor, with ports on private networks).

Servers carry labctl's tags in their metadata. A key pair cannot be tagged: labctl writes the tags as its public
key's comment (Nova keeps the key as sent), which tells the leak audit its key pairs from look-alikes."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from labctl import naming
from labctl.errors import CloudError
from labctl.providers.base import Found, create_or_adopt, create_or_find
from labctl.providers.chameleon.network import ensure_port
from labctl.providers.chameleon.session import DELETE_TIMEOUT, TABLE, Listed, tags_of
from labctl.providers.kit import poll_until
from labctl.redact import clean

if TYPE_CHECKING:
    from labctl.plan import KeypairSpec, Plan, Resource, ServerSpec

NODE_TYPE = "labctl:node_type"  # server metadata: the node type or flavor it runs as
# In the key pair's comment: the deployment's lease names, or a class's marks (Blazar keeps no tags; see leases.py).
LEASES = "labctl:leases"


@TABLE.handler("keypair")
class Keypairs(Listed):
    """Found "error" when it holds another public key (the user's key changed): the engine deletes it and makes
    it again. Its comment records labctl's tags and the deployment's leases (`inventory` lists only those)."""

    service, sdk, shared_find, raw = "compute", "keypair", True, ("/os-keypairs", "keypairs")
    keep = {"public_key": None}

    def found(self, item: Any) -> Found:
        leases = tags_of(item).get(LEASES)
        return Found("keypair", item.name, item.name, attrs={"leases": leases.split(",")} if leases else {})

    def lookup(self, res: Resource, plan: Plan, *, shared: bool) -> Found | None:
        if shared:  # the class's one list of key pairs (they come with their public keys)
            since = self.ctx.written(self.kind, res.name)
            kp = next((k for k in self.listing(plan, since) if k.name == res.name), None)
        else:  # one GET /os-keypairs/NAME (find_keypair would also list every key pair after a 404)
            kp = self.ctx.call("get keypair", lambda: self.ctx.conn.compute.get_keypair(res.name), missing_ok=True)
        if kp is None:
            return None
        if kp.public_key and kp.public_key.split()[:2] != cast("KeypairSpec", res.spec)["public_key"].split()[:2]:
            return Found("keypair", res.name, res.name, status="error", error="the key pair holds another key")
        return self.found(kp)

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        # labctl's tags as the key's comment: the only mark of ownership a Nova key pair can keep.
        leases = res.spec.get("leases") or [r.name for r in plan.by_kind("reservation")]
        marks = {**plan.tags, LEASES: ",".join(leases)}
        key = " ".join([*cast("KeypairSpec", res.spec)["public_key"].split()[:2],
                        *(f"{k}={v}" for k, v in marks.items() if v)])

        def create() -> Found:
            self.ctx.call("create keypair", lambda: self.ctx.raw_create(
                "compute", "/os-keypairs", "keypair", {"name": res.name, "public_key": key}))
            return Found("keypair", res.name, res.name)

        def adopt() -> Found | None:
            # Made by a retry after a lost answer or by a concurrent run: fine if it holds this key.
            again = self.look(res, plan)
            return again if again is not None and again.status == "ready" else None

        return create_or_adopt(create, adopt)


@TABLE.handler("server")
class Servers(Listed):
    service, sdk, filters, gone = "compute", "server", {"details": True}, ("DELETED", "SOFT_DELETED")
    shared_find = True
    keep = dict.fromkeys(("addresses", "fault"))  # `server_found`

    def fetch_all(self) -> list[Any]:  # labctl's names only: its tags then decide
        return self.ctx.raw_list("compute", "/servers/detail", "servers", {"name": f"^{naming.PREFIX}-"},
                                 keep=self.keep)

    def query_name(self, name: str) -> str:
        return f"^{re.escape(name)}$"  # Nova filters names by regular expression

    def found(self, item: Any) -> Found:
        return server_found(self.ctx.site.network, item)

    def polled(self, plan: Plan) -> list[Any]:
        """This deployment's servers, from the poll round's one list of every labctl server on the site."""
        return self.by_deployment(self.ctx.polled("servers", self.fetch_all), plan.deployment)

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s, spec = self.ctx, cast("ServerSpec", res.spec)
        image = s.image(spec["image"])
        hints: dict[str, str] = {}
        if spec.get("reservation"):
            lease = deps[spec["reservation"]]
            node_type = lease.attrs.get("node_type") or ""
            if s.site.reservation == "flavor":
                flavor_name = ""  # Blazar makes the reservation's flavor with the reservation's id: no look-up
            else:
                flavor_name = "baremetal"
                hints["reservation"] = lease.attrs["reservation_id"]
        else:
            node_type = flavor_name = candidate or spec["candidates"][0]
        flavor_id = lease.attrs["reservation_id"] if not flavor_name else flavor_id_of(s, flavor_name)
        nics = [{"uuid": s.network().id}, *({"port": ensure_port(s, spec["node"], net, deps, plan)}
                                           for net in spec.get("networks") or [])]
        body: dict[str, Any] = dict(name=res.name, imageRef=image.id, flavorRef=flavor_id,
                                    key_name=deps["keypair"].name, networks=nics,
                                    metadata={**plan.tags, naming.TAG_NODE: spec["node"], NODE_TYPE: node_type})
        if "secgroup" in deps:
            # By id: Neutron names are not unique (a concurrent run may have made a twin for a moment).
            body["security_groups"] = [{"name": deps["secgroup"].cloud_id}]
        top = {"os:scheduler_hints": hints} if hints else {}

        def launch() -> Found:
            server = s.call(f"launch {spec['node']}",
                            lambda: s.raw_create("compute", "/servers", "server", body, **top), resend=False)
            return Found("server", server.id, res.name, status="pending", attrs={"node": spec["node"]})

        return create_or_find(launch, lambda: self.look(res, plan))

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        s = self.ctx
        for f in found:
            s.call("delete server", lambda f=f: s.conn.compute.delete_server(f.cloud_id, ignore_missing=True))
        ids = {f.cloud_id for f in found}
        poll_until(lambda: ({x.id for x in self.polled(plan)} & ids) or None, status=lambda _left: "deleting",
                   pending=("deleting",), target=("gone",), timeout=DELETE_TIMEOUT, interval=s.poll_interval,
                   not_found_checks=1, what=f"{s.site.name}: servers {sorted(ids)}")

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        server = next((x for x in self.polled(plan) if x.id == found.cloud_id), None)
        return self.found(server) if server else None

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        stage = {"pending": "building", "ready": "booted", "error": "error"}[found.status]
        return (res.spec["node"], stage, found.error or "")


def flavor_id_of(s: Any, name: str) -> str:
    flavor = s.flavor(name)  # looked up once per run
    if flavor is None:
        raise CloudError(f"{s.site.name}: flavor '{name}' not found")
    return str(flavor.id)


def server_found(site_network: str, server: Any) -> Found:
    """Its state and addresses: fixed and floating (the site's network first), `private_ips` on the others."""
    fixed, floating, private = None, None, {}
    for net, addrs in sorted((server.addresses or {}).items(), key=lambda kv: kv[0] != site_network):
        for a in addrs:
            if a.get("OS-EXT-IPS:type") == "floating":
                floating = a.get("addr")
                continue
            fixed = fixed or a.get("addr")
            if net != site_network:
                private[net] = a.get("addr")
    status = {"ACTIVE": "ready", "ERROR": "error"}.get(server.status, "pending")
    error = None
    if status == "error":
        fault = server.fault or {}
        error = fault.get("message") if isinstance(fault, dict) else str(fault)
        error = clean(error, one_line=True) if error else "server went to ERROR"
    meta = server.metadata or {}
    return Found("server", server.id, server.name, status=status, error=error, attrs={
        "node": meta.get(naming.TAG_NODE), "fixed_ip": fixed, "floating_ip": floating, "server_status": server.status,
        "node_type": meta.get(NODE_TYPE), **({"private_ips": private} if private else {})})
