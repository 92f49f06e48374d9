"""The emulated cloud's behaviour, shared by the API modules: lifecycles, capacity, addresses, cascades.

Functions here take an open world transaction (`Db`), a `Site` and the current time. Lifecycle states are
computed from timestamps stored at creation (already multiplied by the time scale), so every process agrees
on them whatever its own time scale.

This package's face: the API modules call `model.<name>`; the code is in `base` (ids, times, tags), `network`
(security groups, networks, subnets, ports, routers, floating IPs), `leases` (flavors, hosts, Blazar leases),
`servers` (keypairs, scheduling, servers), `volumes` (Cinder) and `views` (seed, lifecycle, inventory, SSH)."""

from labctl.testbed.openstack.model.base import (
    BOOT_SECONDS,
    NO_VALID_HOST,
    SCHEDULE_SECONDS,
    VOLUME_TYPE_ID,
    blazar_dt,
    check_tags,
    iso_us,
    iso_z,
    new_id,
    quota,
    stamp,
)
from labctl.testbed.openstack.model.leases import (
    all_flavors,
    create_lease,
    flavors_by_id,
    get_flavor,
    lease_status,
    lease_view,
    parse_lease_date,
    site_hosts,
    update_lease,
)
from labctl.testbed.openstack.model.network import (
    SiteAddresses,
    add_rule,
    allocate_fip,
    allocate_ip,
    associate_fip,
    check_quota,
    create_network,
    create_port,
    create_security_group,
    default_pools,
    delete_port,
    find_security_group,
    fips_used,
    network_ports,
    network_subnets,
    new_port,
    public_subnets,
    quota_used,
    router_ports,
    security_group_in_use,
    server_addresses,
    server_ports,
    sg_rules,
    subnet_ports,
)
from labctl.testbed.openstack.model.servers import (
    check_server_quota,
    compute_usage,
    delete_server,
    fingerprint,
    host_id_for,
    schedule,
    server_status,
)
from labctl.testbed.openstack.model.views import delete_lease, inventory, process_due, seed, ssh_targets
from labctl.testbed.openstack.model.volumes import (
    attach_volume,
    attachment_view,
    create_volume,
    detach_volume,
    start_volume_delete,
    volume_gb_used,
    volume_quota_gb,
    volume_status,
)

__all__ = [
    "BOOT_SECONDS", "NO_VALID_HOST", "SCHEDULE_SECONDS", "VOLUME_TYPE_ID", "SiteAddresses", "add_rule", "all_flavors",
    "allocate_fip", "allocate_ip", "associate_fip", "attach_volume", "attachment_view", "blazar_dt", "check_quota",
    "check_server_quota", "check_tags", "compute_usage",
    "create_lease", "create_network", "create_port", "create_security_group", "create_volume", "default_pools",
    "delete_lease", "delete_port", "delete_server", "detach_volume", "find_security_group", "fingerprint",
    "fips_used", "flavors_by_id", "get_flavor", "host_id_for", "inventory", "iso_us", "iso_z",
    "lease_status", "lease_view", "network_ports", "network_subnets", "new_id", "new_port", "parse_lease_date",
    "process_due", "public_subnets", "quota", "quota_used",
    "router_ports", "schedule", "security_group_in_use", "seed", "server_addresses", "server_ports",
    "server_status", "sg_rules", "site_hosts", "ssh_targets", "stamp", "start_volume_delete", "subnet_ports",
    "update_lease", "volume_gb_used", "volume_quota_gb", "volume_status",
]
