"""The emulated EC2's RunInstances: room per zone and instance type, vCPU limits, and ClientToken idempotency
(moto has neither), as a part of `AwsWorld`."""

from __future__ import annotations

import http.client
import time
import uuid
from urllib.parse import urlencode

from labctl.testbed.aws.common import (
    EC2_NS,
    LIVE_STATES,
    ApiError,
    internal_headers,
    params_hash,
)
from labctl.testbed.aws.daemon import file_lock


class Launches:
    """RunInstances and the idempotent creates of `AwsWorld` (which provides the storage, moto and the facts)."""

    # -- RunInstances with capacity and idempotency ------------------------------------------------------
    def run_instances(self, region: str, params: dict[str, str], forward) -> tuple[int, bytes]:
        """Check token, offering, vCPU limit and capacity, then let `forward(params)` launch."""
        token = params.get("ClientToken")
        generation = self.moto()["generation"]
        digest = params_hash(params)
        with file_lock(self.state_dir / "run.lock"):
            if token:
                stored = self._stored(generation, region, "RunInstances", token)
                if stored is not None:
                    return self._replay(stored, digest, token)
                rebuilt = self._rebuild_from_moto(region, token)
                if rebuilt is not None:
                    self._store(generation, region, "RunInstances", token, digest, 200, rebuilt)
                    return 200, rebuilt
            params = self._place(region, params)
            status, body = forward(params)
            if status == 200:
                if token:
                    self._store(generation, region, "RunInstances", token, digest, status, body)
                self.record_launch(region, params, body)
            return status, body

    def idempotent(self, region: str, action: str, params: dict[str, str], forward) -> tuple[int, bytes]:
        """Any other action that carries a ClientToken: the first success is replayed."""
        token = params["ClientToken"]
        generation = self.moto()["generation"]
        digest = params_hash(params)
        with file_lock(self.state_dir / "token.lock"):
            stored = self._stored(generation, region, action, token)
            if stored is not None:
                return self._replay(stored, digest, token)
            status, body = forward(params)
            if status == 200:
                self._store(generation, region, action, token, digest, status, body)
            return status, body

    def _stored(self, generation: str, region: str, action: str, token: str) -> tuple | None:
        rows = self._read("SELECT params_hash, status, body FROM tokens WHERE generation=? AND region=? AND "
                          "action=? AND token=?", (generation, region, action, token))
        return rows[0] if rows else None

    def _store(self, generation: str, region: str, action: str, token: str, digest: str, status: int,
               body: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO tokens (generation, region, action, token, params_hash, status, "
                       "body, created) VALUES (?,?,?,?,?,?,?,?)",
                       (generation, region, action, token, digest, status, body, time.time()))

    @staticmethod
    def _replay(stored: tuple, digest: str, token: str) -> tuple[int, bytes]:
        if stored[0] != digest:
            raise ApiError(400, "IdempotentParameterMismatch",
                           f"Arguments on this idempotent request are inconsistent with arguments used in "
                           f"previous request(s) with the client token {token}.")
        return int(stored[1]), bytes(stored[2])

    def _rebuild_from_moto(self, region: str, token: str) -> bytes | None:
        """A RunInstances answer rebuilt from moto's reservation holding an instance with this client token
        (moto's own `client-token` filter crashes it, so the reservations are read and matched here)."""
        import xml.etree.ElementTree as ET

        conn = http.client.HTTPConnection("127.0.0.1", self.moto()["port"], timeout=60)
        try:
            body = urlencode({"Action": "DescribeInstances", "Version": "2016-11-15"}).encode()
            conn.request("POST", "/", body=body, headers=internal_headers(region, self.credentials))
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200 or token.encode() not in data:
            return None
        ns = {"e": EC2_NS.rstrip("/")}
        root = ET.fromstring(data)
        for item in root.iterfind("e:reservationSet/e:item", ns):
            tokens = {t.text for t in item.iterfind("e:instancesSet/e:item/e:clientToken", ns)}
            if token not in tokens:
                continue
            ET.register_namespace("", ns["e"])
            out = ET.Element(f"{{{ns['e']}}}RunInstancesResponse")
            ET.SubElement(out, f"{{{ns['e']}}}requestId").text = str(uuid.uuid4())
            for child in item:
                out.append(child)
            return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(out)
        return None

    def _place(self, region: str, params: dict[str, str]) -> dict[str, str]:
        itype = params.get("InstanceType", "m1.small")
        want = max(1, int(params.get("MinCount", "1") or 1))
        zone = params.get("Placement.AvailabilityZone")
        subnet = params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId")
        if not zone and subnet:
            zone = self.subnet_zone(region, subnet)
        offered = self.offered_zones(region, itype)
        if zone and offered and zone not in offered:
            raise ApiError(400, "Unsupported",
                           f"Your requested instance type ({itype}) is not supported in your requested "
                           f"Availability Zone ({zone}). Please retry your request by not specifying an "
                           f"Availability Zone or choosing {', '.join(offered)}.")
        live = self._instances(region, LIVE_STATES)
        limit = self.vcpu_limit(region)
        if limit is not None:
            used = sum(self.vcpus(region, i["InstanceType"]) for i in live)
            if used + want * self.vcpus(region, itype) > limit:
                raise ApiError(400, "VcpuLimitExceeded",
                               f"You have requested more vCPU capacity than your current vCPU limit of {limit} "
                               "allows for the instance bucket that the specified instance type belongs to. "
                               "Please visit http://aws.amazon.com/contact-us/ec2-request to request an "
                               "adjustment to this limit.")

        def room(z: str) -> int | None:
            cap = self.capacity(z, itype)
            if cap is None:
                return None
            used = sum(1 for i in live if i["InstanceType"] == itype and i["Placement"]["AvailabilityZone"] == z)
            return cap - used

        chosen = zone
        if not chosen:  # EC2 picks a zone: the first that has room
            for z in offered or self.zones(region):
                r = room(z)
                if r is None or r >= want:
                    chosen = z
                    break
            else:
                chosen = (offered or self.zones(region))[0]
            params = {**params, "Placement.AvailabilityZone": chosen}
        r = room(chosen)
        if r is not None and r < want:
            others = [z for z in offered if z != chosen and (room(z) is None or room(z) >= want)]
            hint = (f" You can currently get {itype} capacity by not specifying an Availability Zone in your "
                    f"request or choosing {', '.join(others)}.") if others else ""
            raise ApiError(500, "InsufficientInstanceCapacity",
                           f"We currently do not have sufficient {itype} capacity in the Availability Zone you "
                           f"requested ({chosen}). Our system will be working on provisioning additional "
                           f"capacity.{hint}")
        if r is not None and int(params.get("MaxCount", want) or want) > r:
            params = {**params, "MaxCount": str(r)}  # EC2 launches as many as it can, at least MinCount
        return params
