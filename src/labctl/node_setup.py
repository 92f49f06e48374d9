"""The setup phase of `up`: which nodes labctl reaches over SSH (directly or through a jump host), the steps it
adds itself (a student's key, a volume's filesystem and mount), and running them with the profile's steps."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from labctl.errors import SetupFailed
from labctl.state import DeploymentView

Progress = Callable[[str, str, str], None]


@dataclass
class ExtraStep:
    """A setup step labctl adds itself (e.g. authorising a student's key), run before the profile's steps."""

    name: str
    command: str
    timeout: float = 60.0
    on: tuple[str, ...] = ()  # node names; empty: every reachable node
    changes_host: bool = False  # skipped on sim unless --allow-host-changes, like a profile step not safe_on_sim


def volume_steps(the_plan: Any, found: dict[str, Any]) -> tuple[ExtraStep, ...]:
    """The built-in step per attached volume: make a filesystem only if it has none, mount it, add it to fstab."""
    steps = []
    for res in the_plan.by_kind("volume_attachment"):
        f = found.get(res.key)
        if f is None:
            continue
        spec = res.spec
        volume_id = f.attrs.get("volume_id") or ""
        # Stable names first: the adapter's (AWS NVMe / GCP by-id links), else virtio's (the first 20 characters of
        # the volume id); the device the cloud reports (Nova's /dev/vdb) is only a hint.
        paths = list(f.attrs.get("device_paths") or [f"/dev/disk/by-id/virtio-{volume_id[:20]}"])
        paths.append(f.attrs.get("device") or "/dev/vdb")
        mount = spec["mount"]
        fs = spec["filesystem"]
        # Every value from the profile or the cloud is one shell word (the profile also refuses odd mount
        # paths; this is the second line of defence). fstab separates fields by blanks, so its line gets the
        # path in fstab's own octal escapes, as getmntent(3) reads them.
        q_mount = shlex.quote(mount)
        fstab_rest = f" {fstab_escape(mount)} {fs} defaults,nofail 0 2"
        command = "\n".join([
            "set -eu",
            "DEV=",
            f'for d in {" ".join(shlex.quote(p) for p in paths)}; do [ -e "$d" ] && {{ DEV=$d; break; }}; done',
            f'[ -n "$DEV" ] || {{ echo {shlex.quote(f"volume {volume_id} is not attached here")} >&2; exit 1; }}',
            f'sudo blkid "$DEV" >/dev/null || sudo {shlex.quote(f"mkfs.{fs}")} -q "$DEV"',
            f"sudo mkdir -p -- {q_mount}",
            f'mountpoint -q -- {q_mount} || sudo mount -- "$DEV" {q_mount}',
            'UUID=$(sudo blkid -s UUID -o value "$DEV")',
            f'grep -qF "UUID=$UUID " /etc/fstab || printf \'%s\\n\' "UUID=$UUID"{shlex.quote(fstab_rest)} '
            "| sudo tee -a /etc/fstab >/dev/null",
            f'sudo chown "$(id -u):$(id -g)" -- {q_mount}',
        ])
        steps.append(ExtraStep(f"mount volume {spec['volume'].split(':', 1)[-1]} at {mount}", command, 300.0,
                               on=(spec["node"],), changes_host=True))
    return tuple(steps)


def fstab_escape(path: str) -> str:
    """`path` as an /etc/fstab field: backslash, space, tab and newline as octal escapes (\\134, \\040, ...)."""
    return "".join(f"\\{ord(c):03o}" if c in "\\ \t\n" else c for c in path)


def node_targets(site: Any, nodes: list[tuple[str, str]],
                 resources: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
    """SSH targets in node order, and {node: why it cannot be reached}. A node with a floating IP is reached
    directly; one without, through the first node with one that shares a private network with it (at its
    fixed IP there, port 22), as `ssh -J` does."""
    from labctl.runner.ssh import NodeTarget

    direct: dict[str, Any] = {}
    for node, _role in nodes:
        fip = resources.get(f"floating_ip:{node}")
        if fip and fip.get("floating_ip"):
            direct[node] = NodeTarget(node, fip["floating_ip"], site.ssh_port, site.ssh_user)

    def private(node: str) -> dict[str, str]:
        return dict((resources.get(f"server:{node}") or {}).get("private_ips") or {})

    targets, unreachable = [], {}
    for node, _role in nodes:
        if node in direct:
            targets.append(direct[node])
            continue
        mine = private(node)
        hop = next(((j, net) for j in direct for net in mine if net in private(j)), None)
        if hop is None:
            unreachable[node] = ("it has no floating IP and shares no private network with a node that has one"
                                 if direct or not mine else "it has no floating IP and no node has one")
            continue
        jump, net = hop
        targets.append(NodeTarget(node, mine[net], 22, site.ssh_user, via=direct[jump]))
    return targets, unreachable


def run_setup(ctx: Any, prof: Any, the_plan: Any, site: Any, key: Any, found: dict[str, Any],
               allow_host_changes: bool, ssh_timeout: float, extra_steps: tuple[ExtraStep, ...] = (),
               progress: Progress | None = None) -> None:
    from labctl.runner import ssh as runner

    attrs = {k: f.attrs for k, f in found.items()}
    nodes = [(n.name, n.role) for n in the_plan.nodes]
    targets, unreachable = node_targets(site, nodes, attrs)
    progress = progress or ctx.on_progress
    needed = sorted({n for step in prof.setup for n, role in nodes if n in unreachable
                     and ({step.on} if isinstance(step.on, str) else set(step.on)) & {"all", n, role}})
    if needed:
        raise SetupFailed(
            "labctl cannot reach " + "; ".join(f"{n} ({unreachable[n]})" for n in needed)
            + " over SSH, so setup cannot run there: give it a floating IP (nodes.<role>.floating_ip) or put "
            "it on a private network with a node that has one"
        )
    for node, why in unreachable.items():
        progress(node, "unreachable", why)
    if not targets:
        return
    view = DeploymentView(ctx.store, the_plan.deployment)
    reachable = {t.name for t in targets}
    everywhere = [n for n, _ in nodes if n in reachable]

    def sim_skip(safe: bool, command: str, uploads: tuple[Any, ...] = ()) -> str | None:
        """Why a step does not run on sim (None: it runs); for a host-changing step, the testbed says (its nodes
        may be machines, where such a step changes only the node: `labctl.testbed.node_machine`)."""
        if not site.emulated or safe or allow_host_changes:
            return None
        from labctl.testbed.node_machine import sim_skip_reason

        return sim_skip_reason(command, uploads)

    steps = [runner.SetupStep(i, x.name, [n for n in everywhere if not x.on or n in x.on], x.command, [], x.timeout,
                       sim_skip(not x.changes_host, x.command)) for i, x in enumerate(extra_steps)]
    for index, step in enumerate(prof.setup, start=len(extra_steps)):
        on = [step.on] if isinstance(step.on, str) else list(step.on)
        step_nodes = [n for n, role in nodes if ("all" in on or n in on or role in on) and n in reachable]
        # Scripts and uploads are checked again (symbolic links resolved, under labs/<lab>/ or labs/_common/).
        field = f"setup[{index - len(extra_steps)}].script"
        command = step.run if step.run is not None else prof.read_script(step.script, field)
        skip = sim_skip(step.safe_on_sim, command, tuple(prof.lab_dir / u.src for u in step.upload))
        uploads = [runner.Upload(prof.lab_dir / u.src, u.dest, prof.lab_roots()) for u in step.upload]
        steps.append(runner.SetupStep(index, step.name, step_nodes, command, uploads, step.timeout, skip))
    progress("ssh", "waiting", f"{len(targets)} node(s)")
    # A booting node drops SSH packets just as a firewall does; on real sites, only call port 22 "blocked"
    # once the node has had time to boot (bare metal takes minutes after ACTIVE).
    blocked_after = None if site.emulated else {"chi": 900.0, "kvm": 240.0}.get(site.family, 300.0)
    results = runner.run_setup(targets, steps, key.private_path, view, view,
                               ctx.store.logs_dir / the_plan.deployment,
                               on_event=lambda node, step, st: progress(node, f"setup {st}", step),
                               wait_first=runner.WaitFirst(ssh_timeout, progress, blocked_after))
    failed = [r for r in results.values() if not r.ok]
    if failed:
        ctx.store.set_deployment_status(the_plan.deployment, "setup-failed")
        first = failed[0]
        raise SetupFailed(
            f"setup step '{first.failed_step}' failed on {', '.join(r.node for r in failed)}; "
            f"log: {first.log_path}; run 'labctl up' again to resume at that step\n{first.log_tail}"
        )
