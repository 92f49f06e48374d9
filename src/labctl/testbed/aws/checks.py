"""EC2's refusals that moto lacks (the front layer raises them as EC2's errors before forwarding a request).
`client` gives a boto3 EC2 client straight to moto, called only for the actions checked here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from labctl.testbed.aws.common import ApiError


def check_request(client: Callable[[], Any], action: str, params: dict[str, str]) -> dict[str, str]:
    """EC2's refusals that moto lacks, raised as EC2's errors; returns the params to forward.

    - AttachVolume: a volume attached already (VolumeInUse), in another zone than the instance
      (InvalidVolume.ZoneMismatch), or an instance that is not running or stopped (IncorrectState);
    - DetachVolume without InstanceId (moto crashes): the volume's instance; of a detached volume:
      IncorrectState;
    - DeleteVpc while an internet gateway is attached or a security group other than `default` is left, and
      DeleteSubnet while a network interface is in it: DependencyViolation.
    """
    handler = {"AttachVolume": _check_attach, "DetachVolume": _check_detach,
               "DeleteVpc": _check_delete_vpc, "DeleteSubnet": _check_delete_subnet}.get(action)
    return handler(client(), params) if handler else params


def _volume(cli: Any, volume_id: str) -> dict | None:
    try:
        vols = cli.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    except Exception:  # noqa: BLE001 - moto answers the request itself with the real error
        return None
    return vols[0] if vols else None


def _check_attach(cli: Any, params: dict[str, str]) -> dict[str, str]:
    vol = _volume(cli, params.get("VolumeId", ""))
    if vol is None:
        return params
    if vol.get("Attachments"):
        raise ApiError(400, "VolumeInUse", f"{vol['VolumeId']} is already attached to an instance")
    try:
        out = cli.describe_instances(InstanceIds=[params.get("InstanceId", "")])
    except Exception:  # noqa: BLE001
        return params
    instances = [i for r in out["Reservations"] for i in r["Instances"]]
    if not instances:
        return params
    inst = instances[0]
    if inst["State"]["Name"] not in ("running", "stopped"):
        raise ApiError(400, "IncorrectState",
                       f"Instance '{inst['InstanceId']}' is not 'running' or 'stopped'.")
    if inst["Placement"]["AvailabilityZone"] != vol["AvailabilityZone"]:
        raise ApiError(400, "InvalidVolume.ZoneMismatch",
                       f"The volume '{vol['VolumeId']}' is not in the same availability zone as instance "
                       f"'{inst['InstanceId']}'")
    return params


def _check_detach(cli: Any, params: dict[str, str]) -> dict[str, str]:
    vol = _volume(cli, params.get("VolumeId", ""))
    if vol is None:
        return params
    attached = vol.get("Attachments") or []
    if not attached or (params.get("InstanceId") and params["InstanceId"] not in
                        {a.get("InstanceId") for a in attached}):
        raise ApiError(400, "IncorrectState", f"Volume '{vol['VolumeId']}' is in the '{vol['State']}' state.")
    if not params.get("InstanceId"):
        params = {**params, "InstanceId": attached[0]["InstanceId"]}
    return params


def _check_delete_vpc(cli: Any, params: dict[str, str]) -> dict[str, str]:
    vpc = params.get("VpcId", "")
    gateways = cli.describe_internet_gateways(
        Filters=[{"Name": "attachment.vpc-id", "Values": [vpc]}])["InternetGateways"]
    groups = [g for g in cli.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]}])[
        "SecurityGroups"] if g["GroupName"] != "default"]
    if gateways or groups:
        raise ApiError(400, "DependencyViolation", f"The vpc '{vpc}' has dependencies and cannot be deleted.")
    return params


def _check_delete_subnet(cli: Any, params: dict[str, str]) -> dict[str, str]:
    subnet = params.get("SubnetId", "")
    enis = cli.describe_network_interfaces(
        Filters=[{"Name": "subnet-id", "Values": [subnet]}])["NetworkInterfaces"]
    if enis:
        raise ApiError(400, "DependencyViolation",
                       f"The subnet '{subnet}' has dependencies and cannot be deleted.")
    return params
