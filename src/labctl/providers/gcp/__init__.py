"""Google Compute Engine adapter (google-cloud-compute over REST, Application Default Credentials).

How labctl's plan maps onto Compute Engine:
- `keypair`: GCP has no key pairs. The public key goes into each instance's `ssh-keys` metadata as
  `<site.ssh_user>:<key>`; the keypair resource is a Found that only carries the key.
- `server`: `instances.insert` with labels `labctl-deployment`, `labctl-lab`, `labctl-owner`, `labctl-node`
  (label keys cannot contain ':'), the candidate machine type (`n1-standard-4+t4` = n1-standard-4 with one
  nvidia-tesla-t4), `onHostMaintenance=TERMINATE` for GPU machines, a boot disk from the image family that
  the abstract image name maps to, and an external IP (ephemeral, or the node's static address if one is
  reserved). Every insert carries a `requestId` derived from deployment, node, type, zone and attempt, so an
  insert that is retried after a timeout returns the first operation instead of making a second instance.
- The lab's end: every instance gets `scheduling.terminationTime` = launch + the profile's lease_hours with
  `instanceTerminationAction: DELETE` ("Limit the run time of a VM": a STANDARD provisioning model VM may have
  one; 30 s to 120 days). Compute Engine deletes it then, its boot disk with it; volumes are separate disks
  attached with autoDelete false, so kept ones survive. The server's attrs['end'] is that time. `extend` asks
  `instances.setScheduling` for a later one, which Compute Engine accepts only on a stopped instance: on a
  running one its refusal becomes a UserError saying what to do.
- `floating_ip`: a static regional address named after the node and labelled; the instance's ephemeral
  address is promoted in place (same IP), or the address is put into the instance's access config.
- `network` / `subnet`: a custom-mode VPC network (`autoCreateSubnetworks: false`) and one subnetwork in the
  site's region (`ipCidrRange` = the profile's cidr; Compute Engine sets the gateway to its first host). A node on
  the network has its one interface there, with `networkIP` = its fixed IP, and keeps an ephemeral external
  address (outbound traffic, as on Chameleon's shared network); `attrs["private_ips"]` = {network: networkIP}.
- `secgroup`: a VPC firewall rule named after the deployment (one more per extra source range), with
  `targetTags=[<deployment>]`, which instances carry; with private networks, the firewalls go on the
  deployment's network, plus one per network without port security allowing every protocol from its CIDR.
- Firewalls, networks and subnetworks have no labels: labctl's marks (`labctl:deployment=<id>
  labctl:owner=<owner>`) are in their descriptions.
- `router`: nothing to make (a VPC network has a default route to the internet); a ready Found, delete is a no-op.
- `volume`: a pd-balanced zonal disk in its server's zone (at least 10 GB: Compute Engine's minimum), labelled
  like instances plus `labctl-keep` and `labctl-volume`; a kept disk of an earlier `up` is found by name and
  labels and reused (on a region site the server is then launched in the disk's zone). `volume_attachment`:
  `instances.attachDisk` with deviceName = the disk's name, seen in the guest as /dev/disk/by-id/google-<name>.
- Zones: `gcp:<zone>` uses that zone only; `gcp:<region>` tries the region's zones that offer the type, in
  order, moving on when one answers ZONE_RESOURCE_POOL_EXHAUSTED, and raises NoCapacity when none has room
  (the engine then tries the next type). Regional quota errors are the same in every zone: a quota on a
  type-specific metric (NVIDIA_T4_GPUS, A2_CPUS...) raises NoCapacity at once (another type may have quota),
  any other (CPUS, IN_USE_ADDRESSES...) raises QuotaExceeded.
- `wait` polls with one `instances.list` (one zone) or `instances.aggregatedList` (several zones) per round,
  filtered by the deployment label. Operations are waited with the operations clients built on the same
  endpoint (`ExtendedOperation.result()` would poll the default Google host).

Modules: `session` (credentials, the error table, names and labels, clients, calls, operations), `instances`
(servers), `resources` (the table of the other collections and their handlers), `provider` (`GcpProvider`,
`connect`). `google.cloud.compute_v1` takes seconds to import: it is imported only inside functions.
"""

from labctl.providers.gcp.instances import IMAGE_FAMILIES, parse_type
from labctl.providers.gcp.provider import GcpProvider, connect, describe_credentials
from labctl.providers.gcp.session import NO_CREDENTIALS, NO_PROJECT, gce_name, google_credentials, register_credentials

__all__ = ["IMAGE_FAMILIES", "NO_CREDENTIALS", "NO_PROJECT", "GcpProvider", "connect", "describe_credentials",
           "gce_name", "google_credentials", "parse_type", "register_credentials"]
