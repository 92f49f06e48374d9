"""AWS adapter (boto3): key pairs, security groups, instances and Elastic IPs (in the region's default VPC, or in a
VPC of the deployment's own when the lab has a private network), EBS volumes and S3 buckets.

Layout: `session` (credentials, clients, the error table, `call`, `Ec2Kind`: how each EC2 family is listed by
labctl's tags and deleted, the handler TABLE), `instances` (images, zones, key pairs, servers, Elastic IPs),
`network` (VPC, subnet, router, security group), `storage` (volumes, attachments, buckets). Credentials come from
the standard chain (`--cloud PROFILE`, AWS_PROFILE, the AWS_* keys, SSO, config files); an emulated site
(`sim-aws`) talks to the testbed's EC2 front layer with the emulated world's own key.

How the usual EC2 traps are handled:
- every launch carries a deterministic `ClientToken` (deployment, node, type, zone, attempt), so a resent or
  repeated `RunInstances` never makes a second instance; everything is tagged at creation, so a rerun finds it;
- no capacity in one zone: a region site tries the region's other zones (their default subnets) before raising
  `NoCapacity` (the engine tries the next type); `VcpuLimitExceeded` & co. become `QuotaExceeded`;
- clients retry at most once by themselves; throttling and transient errors are retried here with backoff;
- `wait` makes one `DescribeInstances` per poll round for every node (shared by a class's deployments of a lab);
- the calls without an idempotency token (CreateVpc, CreateSubnet, CreateInternetGateway, AllocateAddress) are
  never resent blindly: after a lost answer the tagged resource is looked up first; two racing runs that both
  made one converge on one (`base.converge_created`);
- Elastic IPs are disassociated before they are released (AWS does it on termination, emulators may not).

How the provider-neutral kinds map onto AWS:
- `network`: a VPC (CIDR = its subnet's) with an internet gateway and a 0.0.0.0/0 route in its main route table:
  every node keeps an ephemeral public IPv4 for outbound traffic (as Chameleon's shared network), and Elastic IPs
  work. A rerun after a crash between these calls finishes them ("incomplete"). `router`: that gateway.
- `subnet`: one, in one zone: the site's, or that of a volume kept for one of its nodes, or the first zone that
  offers every candidate type of its nodes; they are launched there only (a full zone means the next type).
- `secgroup`: in the deployment's VPC (or the default one), plus all traffic from the network's CIDR when the
  network has no port security. `server` on a network: one interface with the node's fixed IP, the group and a
  public IPv4; `attrs["private_ips"]` = {network name: IP}, so nodes without an Elastic IP are reached via one.
- `volume`: gp3 EBS in its server's zone, tagged `labctl:keep` / `labctl:volume`, reused by the next `up` (whose
  server then goes to its zone); attached at /dev/sdf, /dev/sdg... (/dev/disk/by-id/nvme-Amazon_Elastic_Block_
  Store_vol<id> on Nitro). `bucket`: S3, named after the resource (lower case); delete empties every version first.

The lease end. EC2 has no leases, so each node ends itself: it is launched with InstanceInitiatedShutdownBehavior
`terminate`, instance tags in its metadata (IMDS) and the tag `labctl-ends-at` = now + the profile's lease_hours
(ISO 8601, UTC; the server's attrs['end']); its user data (cloud-config, beside the extra authorized keys) installs
a systemd timer that reads that tag every minute through IMDSv2 and powers the node off once it has passed, which
terminates it. `extend` moves the tag (CreateTags); the timer reads the new one. What it does not cover:
- anyone with sudo on the node can stop the timer (or the node's IMDS access), and anyone allowed ec2:CreateTags or
  ec2:ModifyInstanceMetadataOptions can move or hide the end: it is a guard against forgotten labs, not a control;
- it ends instances only: the data volumes and buckets that `down` keeps (and Elastic IPs, security groups, VPCs)
  stay, and bill, until `down` or `labctl gc`; data volumes are attached separately, so never DeleteOnTermination
  (the instance's root volume is, and goes with it);
- a node that never boots its timer (no cloud-init, another image) is not ended.

boto3 is imported only inside functions: `import labctl.providers.aws` loads no SDK.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl import naming
from labctl.errors import CloudError, CredentialsError, UserError
from labctl.providers import kit
from labctl.providers.aws import instances, network, storage
from labctl.providers.aws.instances import IMAGES
from labctl.providers.aws.session import KINDS, AwsSession, labelled, load_session, tagged, tags_of
from labctl.providers.aws.storage import bucket_name
from labctl.providers.base import Found, ProgressFn

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site

MISSING_GRACE = 30.0  # seconds a new instance may be absent from DescribeInstances (eventual consistency)


def connect(site: Site, *, cloud: str | None = None, testbed: Callable[[], Any] | None = None) -> AwsProvider:
    """Credentials from the standard AWS chain (or profile `cloud`), or the emulated testbed for `sim-aws`."""
    if site.emulated:
        if testbed is None:
            raise UserError(f"{site.name} is emulated but no testbed was given")
        tb = testbed()
        emu = tb.aws()
        site = dataclasses.replace(site, ssh_port=getattr(tb, "ssh_port", None) or emu.world.ssh_port)
        # The emulated world's own access key (private to its owner; registered with labctl.redact).
        return AwsProvider(site, emu.world.session(site.region), endpoint_url=emu.endpoint,
                           credential_source="the emulated testbed")
    session, source = load_session(site, cloud)
    return AwsProvider(site, session, credential_source=source)


def describe_credentials(site: Site, cloud: str | None = None) -> str:
    """One line for `labctl sites`: where the AWS credentials come from, or what is missing."""
    try:
        return f"found: {load_session(site, cloud)[1]}"
    except CredentialsError as exc:
        return "missing: " + str(exc).removeprefix(f"{site.name}: ")


class AwsProvider(AwsSession):
    """The `Provider` for EC2 and S3: each kind's find / create / delete is its handler's (`session.TABLE`)."""

    def preflight(self, plan: Plan) -> None:
        """Credentials (the first call fails on bad ones), images, and that each node has a type here."""
        for image in sorted({n.image for n in plan.nodes}):
            instances.image(self, image)
        for res in plan.by_kind("bucket"):
            if bucket_name(res.name) is None:
                raise UserError(storage.bad_bucket(self, res))
        for res in plan.by_kind("server"):
            for net in res.spec.get("networks") or []:
                network.check_fixed_ip(self, res, net, plan)
        if not (types := sorted({c for n in plan.nodes for c in n.candidates})):
            return
        offered = instances.offered_zones(self, types)
        # Nodes on the deployment's own network use its VPC: a region without a default VPC is fine for them.
        own_network = all(r.spec.get("networks") for r in plan.by_kind("server"))
        zones = instances.region_zones(self) if own_network else set(instances.default_subnets(self))
        for node in plan.nodes:
            if node.candidates and not any(offered[c] & zones for c in node.candidates):
                raise UserError(f"{self.site.name}: none of {', '.join(node.candidates)} (for {node.name}) is "
                                f"offered in {self.site.zone or self.region}")

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        if res.kind not in self.kinds:
            raise CloudError(f"{self.site.name}: AWS has no '{res.kind}' resources")
        return self.handlers[res.kind].create(res, plan, deps, candidate)

    def delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        if found and kind in self.kinds:
            self.handlers[kind].delete(found, plan)

    def wait(self, items: Sequence[tuple[Resource, Found]], plan: Plan, timeout: float,
             on_progress: ProgressFn) -> list[Found]:
        """Servers, volumes and attachments until ready or failed: one DescribeInstances and one DescribeVolumes
        per poll round for all of them (the instance list shared by the deployments of a class)."""
        results = {res.key: found for res, found in items}
        start = time.monotonic()

        def pending() -> list[tuple[Resource, Found]]:
            return [(r, results[r.key]) for r, _ in items if results[r.key].status == "pending"]

        def refresh() -> str:
            todo, missing = pending(), time.monotonic() - start > MISSING_GRACE
            if servers := [(r, f) for r, f in todo if r.kind == "server"]:
                instances.poll(self, servers, plan, results, missing, on_progress)
            if volumes := [(r, f) for r, f in todo if r.kind in ("volume", "volume_attachment")]:
                storage.poll(self, volumes, results, missing, on_progress)
            for r, _ in todo:
                if r.kind not in ("server", "volume", "volume_attachment"):  # nothing else has a pending state
                    results[r.key].status = "ready"
            return "pending" if pending() else "done"

        try:
            kit.poll_until(refresh, status=lambda s: s, pending=("pending",), target=("done",), timeout=timeout,
                           interval=self.poll_interval, what=f"{self.site.name}: {plan.deployment}")
        except kit.WaitTimedOut:
            for _, f in pending():
                f.status, f.error = "error", f"still not running after {timeout:.0f}s"
        return [results[r.key] for r, _ in items]

    def list_owned(self, plan: Plan) -> list[Found]:
        """Everything tagged with the deployment: instances, Elastic IPs, key pairs, security groups, VPCs and
        internet gateways (both kind "network"), subnets, volumes and their attachments, and buckets (S3 only when
        the plan has buckets: an EC2-only account (IAM policy) is never asked)."""
        out = [kind.found(item) for kind in KINDS for item in kind.list(self, tagged(plan), owned=True)]
        out += [a for vol in out if vol.kind == "volume" for a in storage.attachments_of(vol)]
        return out + (storage.buckets(self, plan.deployment) if plan.by_kind("bucket") else [])

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        """A server's end (the tag its own timer reads) `hours` later; AWS has nothing else with an end."""
        if found.kind != "server":
            raise UserError(f"{self.site.name}: AWS has no leases; only a server's end can be moved")
        return instances.extend(self, found, hours)

    def inventory(self) -> list[Found]:
        """Every EC2 resource and S3 bucket of the region that carries labctl's deployment tag, of any deployment
        (the tag is what counts: a look-alike name without it is never listed)."""
        any_deployment = [{"Name": "tag-key", "Values": [naming.TAG_DEPLOYMENT]}]
        listed = [(kind, item, tags_of(item.get("Tags"))) for kind in KINDS
                  for item in kind.list(self, any_deployment, owned=True)]
        # (checked here too: EC2 may merge two tag-key filters, as a data volume's listing adds one)
        return [labelled(kind.found(item), tags, item.get(kind.created) if kind.created else None)
                for kind, item, tags in listed if naming.TAG_DEPLOYMENT in tags] + storage.buckets(self)


__all__ = ["IMAGES", "AwsProvider", "bucket_name", "connect", "describe_credentials"]
