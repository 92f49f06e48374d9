"""Forwarding on the emulated nodes: `ssh -L PORT:localhost:PORT` to the host's 127.0.0.1 (the node's own
localhost, not filtered), and the jump-host hop: a node forwarding to `<fixed IP>:22` of a node on a network it
shares reaches that node's internal listener, if the destination's firewall lets the jump node in.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

FORWARD_HOSTS = frozenset({"127.0.0.1", "localhost"})


# jump-host hops -----------------------------------------------------------------------------
def private_destination(targets: list[dict], jump: dict, dest_host: str, dest_port: int) -> tuple[dict, str] | None:
    """(target, network) of the node at `dest_host:22` on a network `jump` is on, if any."""
    nets = list(jump.get("fixed_ips") or {})
    if int(dest_port) != 22 or not nets:
        return None
    for t in targets:
        if t.get("site") != jump.get("site") or not t.get("internal_address"):
            continue
        for net in nets:
            if (t.get("fixed_ips") or {}).get(net) == dest_host:
                return t, net
    return None

async def forward_private(sshd: Any, jump: dict, dest: dict, network: str):
    """The jump host's connection to `<dest's fixed IP>:22`: it crosses the network, so dest's firewall
    rules apply, with the jump host (its fixed IP on `network`) as the source."""
    import asyncssh

    from labctl.testbed.firewall import Peer

    peer = Peer(str((jump.get("fixed_ips") or {}).get(network)), jump, network)
    if not await sshd.allowed(dest, 22, peer):
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED,
            f"{(dest.get('fixed_ips') or {}).get(network)}:22 is not reachable from {peer.ip}: the "
            f"firewall rules of {dest.get('name')} drop the connection")
    listener = (str(dest["internal_address"]), int(dest["port"]))
    # A node that just became ACTIVE may not be served yet: wait a little for its listener.
    deadline = time.monotonic() + 5.0
    while listener not in sshd.listening() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return await forward_tcp(*listener)



async def forward_tcp(host: str, port: int):
    """A forwarded TCP connection for a direct-tcpip channel: asyncssh's `conn.forward_connection(host, port)`,
    except that the channel is closed once both directions have ended, whichever ended first, as sshd does.

    asyncssh's forwarder closes the channel only when the TCP side ends last: when the TCP peer hangs up first
    (the inner node of a jump-host hop drops the connection before the client's EOF arrives), the channel's
    `eof_received` returns False -- which closes an asyncio transport, but not an SSH channel -- and the channel
    stayed half-open for ever, so `ssh -W` (ProxyCommand/ProxyJump) never exited unless SIGHUP killed it.
    """
    import asyncssh
    from asyncssh.forward import SSHForwarder

    class ClosingForwarder(SSHForwarder):
        def eof_received(self) -> bool:
            keep_open = super().eof_received()
            if not keep_open:
                self.close()
            return keep_open

    try:
        _, peer = await asyncio.get_running_loop().create_connection(SSHForwarder, host, port)
    except OSError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
    return ClosingForwarder(peer)
