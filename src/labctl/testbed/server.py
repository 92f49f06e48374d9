"""The testbed's HTTP endpoint: every emulated site's APIs behind one 127.0.0.1 port, and `Testbed`.

URL layout (PORT is ephemeral unless asked otherwise):

    http://127.0.0.1:PORT/<site>/identity/v3        Keystone   (site: chi-tacc, chi-uc, kvm-tacc, chi-edge)
    http://127.0.0.1:PORT/<site>/compute/v2.1       Nova
    http://127.0.0.1:PORT/<site>/network            Neutron    (clients append /v2.0)
    http://127.0.0.1:PORT/<site>/image              Glance     (clients append /v2)
    http://127.0.0.1:PORT/<site>/reservation/v1     Blazar
    http://127.0.0.1:PORT/<site>/volume/v3/<project> Cinder     (kvm-tacc only: the bare-metal sites have none)
    http://127.0.0.1:PORT/<site>/object-store/v1/AUTH_<project>  Swift (chi-tacc, chi-uc, kvm-tacc)
    http://127.0.0.1:PORT/refapi/sites.json         resource discovery (CHI_RESOURCE_API_URL=.../refapi)

With `site_addresses=True` (`labctl testbed serve`, the compatibility tests), each site also has an address of its
own, as each real site has a host name, with Keystone on port 5000 there, where python-chi's `use_site` looks for it
(`<sites.json web>:5000/v3`):

    http://127.40.B.N:5000/v3                       Keystone of site N (1 chi-tacc, 2 chi-uc, 3 kvm-tacc, 4 chi-edge)

B is the first block from 1 to 254 whose four addresses are free on port 5000 (another testbed may hold one).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from labctl.testbed.http import MAX_JSON_BODY, MAX_OBJECT_BODY, EmulatorHandler, HTTPError, Request, Response
from labctl.testbed.openstack import blazar, cinder, glance, keystone, neutron, nova, refapi, swift
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.world import World

SERVICES: dict[str, ModuleType] = {
    "identity": keystone,
    "compute": nova,
    "network": neutron,
    "image": glance,
    "reservation": blazar,
    "volume": cinder,
    "object-store": swift,
}


@dataclass
class Outcome:
    response: Response
    action: str = "respond"  # respond | hang | drop


SITE_NET = "127.40"  # each site's own address: 127.40.<block>.<site number>
KEYSTONE_PORT = 5000  # as on every real Chameleon site


class App:
    """Routes one request to a service, with the testbed's cross-cutting behaviour: request log, lazy
    lifecycle, latency, token check and fault injection."""

    def __init__(self, world: World, base_url: str, stop_event: threading.Event):
        self.world = world
        self.base_url = base_url
        self.stop_event = stop_event
        self.site_webs: dict[str, str] = {}  # site name -> http://127.40.B.N, when the sites have addresses
        self.unvalidated: list[str] = []  # requests whose body a handler failed on without validating it

    def _error(self, module: ModuleType, err: HTTPError) -> Response:
        if err.body is not None:
            return Response(err.status, err.body, dict(err.headers))
        body = module.error_body(err.status, err.message, err.kind)
        ctype = getattr(module, "ERROR_CONTENT_TYPE", "application/json")
        return Response(err.status, body, dict(err.headers), content_type=ctype)

    def refusal(self, raw_path: str, status: int, message: str) -> Response:
        """A request refused before it was routed (its body unreadable): the error in the path's service's shape."""
        parts = unquote(urlsplit(raw_path).path).strip("/").split("/", 2)
        module: ModuleType = refapi
        if parts[0] in cat.BY_SLUG and len(parts) >= 2 and parts[1] in SERVICES:
            module = SERVICES[parts[1]]
        kind = {400: "BadRequest", 413: "RequestEntityTooLarge"}.get(status)
        return self._error(module, HTTPError(status, message, kind))

    def _unauthorized(self, site: cat.Site) -> HTTPError:
        body = keystone.error_body(401, keystone.UNAUTHORIZED, "Unauthorized")
        return HTTPError(
            401,
            keystone.UNAUTHORIZED,
            headers={"WWW-Authenticate": f'Keystone uri="{self.base_url}/{site.slug}/identity"'},
            body=body,
        )

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> Outcome:
        url = urlsplit(raw_path)
        path = unquote(url.path)
        query = parse_qs(url.query, keep_blank_values=True)
        parts = path.strip("/").split("/", 2)
        site: cat.Site | None = None
        module: ModuleType = refapi
        if parts[0] == "refapi":
            rel = "/" + "/".join(parts[1:])
            log_site, log_path = "refapi", rel
        elif parts[0] in cat.BY_SLUG and len(parts) >= 2 and parts[1] in SERVICES:
            site = cat.BY_SLUG[parts[0]]
            module = SERVICES[parts[1]]
            rel = "/" + parts[2] if len(parts) > 2 else "/"
            log_site, log_path = site.name, "/" + "/".join(parts[1:])
            if parts[1] not in site.services:
                self.world.log_request(log_site, method, log_path, url.query)
                return Outcome(self._error(module, HTTPError(404, "The resource could not be found.")))
        else:
            self.world.log_request(None, method, path, url.query)
            return Outcome(
                Response(
                    404,
                    {
                        "error": {
                            "code": 404,
                            "message": "The resource could not be found.",
                            "title": "Not Found",
                        }
                    },
                )
            )
        if rel.endswith(".json") and module in (refapi, neutron, blazar):
            rel = rel[: -len(".json")]
        req = Request(
            method=method,
            path=rel,
            query=query,
            headers=headers,
            body=body,
            world=self.world,
            site=site,
            base_url=self.base_url,
            service=parts[1] if site else "refapi",
            site_webs=self.site_webs,
        )
        template = None
        try:
            prefix = getattr(module, "PREFIX", "")
            if prefix and rel.rstrip("/") in ("", "/"):
                handler, auth, template = module.root, False, "/"
            else:
                if prefix:
                    if not (rel == prefix or rel.startswith(prefix + "/")):
                        raise HTTPError(404, "The resource could not be found.", "NotFound")
                    rel = rel[len(prefix) :] or "/"
                    req.path = rel
                found = module.router.match(method, rel)
                if not found:
                    raise HTTPError(404, "The resource could not be found.", "NotFound")
                route, req.params = found
                handler, auth, template = route.handler, route.auth, route.template
        except HTTPError as e:
            self.world.log_request(log_site, method, log_path, url.query)
            return Outcome(self._error(module, e))
        operation = f"{method} {template}"
        self.world.log_request(log_site, method, log_path, url.query, operation)
        fault = None
        try:
            self.world.tick()
            req.now = time.time()
            delay = self.world.latency_for(method, template, rel)
            if delay:
                time.sleep(delay * self.world.time_scale)
            if auth and site is not None:
                token_id = headers.get("X-Auth-Token")
                with self.world.read() as db:
                    token = db.token(token_id) if token_id else None
                if not token or token["site"] != site.name:
                    raise self._unauthorized(site)
                req.token = token
            if site is not None:
                fault = self.world.take_fault(site.name, method, template, rel)
            if fault and fault[0] == "error500":
                raise HTTPError(
                    500, fault[1] or "Internal Server Error (injected by the testbed)", "InternalServerError"
                )
            if fault and fault[0] == "error429":
                raise HTTPError(
                    429,
                    fault[1] or "Rate limit exceeded: too many requests (injected by the testbed)",
                    "OverLimit",
                    headers={"Retry-After": "1"},
                )
            if fault and fault[0] == "server_error_state":
                req.fault = fault
            req.now = time.time()
            try:
                response = handler(req)
            except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
                if not body:
                    raise
                # A body field of the wrong type that the handler does not validate yet: a 400, as the real
                # API's schema check would answer, and counted (the fuzz tests require none).
                import traceback

                traceback.print_exc(file=sys.stderr)
                self.unvalidated.append(f"{method} {template}: {e!r}")
                raise HTTPError(400, f"Invalid input in the request body: {type(e).__name__}.", "BadRequest") from None
        except HTTPError as e:
            response = self._error(module, e)
        if fault and fault[0] == "hang_after":
            return Outcome(response, "hang")
        if fault and fault[0] == "timeout_after":
            return Outcome(response, "drop")
        return Outcome(response)


class _Handler(EmulatorHandler):
    server_version = "labctl-testbed/1"
    sys_version = ""
    server: _Server

    def body_limit(self) -> int:
        """Object uploads (Swift objects, Glance image data) may be large; every other body is JSON."""
        if self.command == "PUT":
            parts = urlsplit(self.path).path.strip("/").split("/")
            if len(parts) > 1 and (parts[1] == "object-store" or (parts[1] == "image" and parts[-1] == "file")):
                return MAX_OBJECT_BODY
        return MAX_JSON_BODY

    def refuse(self, status: int, message: str) -> None:
        resp = self.server.app.refusal(self.path, status, message)
        self._send(resp)

    def serve(self, body: bytes) -> None:
        try:
            outcome = self.server.app.handle(self.command, self.path, self.headers, body)
        except Exception as e:  # a bug in the testbed: answer 500 rather than dropping the connection
            import traceback

            traceback.print_exc(file=sys.stderr)
            outcome = Outcome(
                Response(
                    500,
                    {
                        "error": {
                            "code": 500,
                            "message": f"testbed bug: {e!r}",
                            "title": "Internal Server Error",
                        }
                    },
                )
            )
        if outcome.action == "hang":
            self.hang(self.server.stop_event)
            return
        if outcome.action == "drop":
            self.drop()
            return
        self._send(outcome.response)

    def _send(self, resp: Response) -> None:
        payload = resp.encode()
        self.answer(
            resp.status,
            payload,
            resp.content_type if payload or resp.status not in (204, 304) else None,
            [("X-Openstack-Request-Id", f"req-{uuid.uuid4()}"), *resp.headers.items()],
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    app: App
    world: World
    stop_event: threading.Event


class _KeystoneHandler(_Handler):
    """A site's own address, port 5000: its Keystone, as `/v3/...` (the path below the shared endpoint's
    `/<site>/identity`); anything else there is Keystone's 404."""

    server: _SiteServer

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        self.path = f"/{self.server.slug}/identity/{self.path.lstrip('/')}"
        return True


class _SiteServer(_Server):
    slug: str


def _serve_in_thread(server: _Server) -> threading.Thread:
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.2},
        name=f"labctl-testbed-{server.server_address[0]}:{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return thread


def _bind_site_block(block: int, main: _Server) -> list[_SiteServer] | None:
    """Every site's Keystone listener in `block` (127.40.<block>.<n>:5000), or None when one address is taken."""
    bound: list[_SiteServer] = []
    try:
        for site in cat.SITES.values():
            server = _SiteServer((f"{SITE_NET}.{block}.{site.number}", KEYSTONE_PORT), _KeystoneHandler)
            server.slug, server.app, server.world, server.stop_event = site.slug, main.app, main.world, main.stop_event
            bound.append(server)
    except OSError:
        for server in bound:
            server.server_close()
        return None
    return bound


def _bind_site_addresses(main: _Server, preferred: int | None) -> tuple[int, list[_SiteServer]] | None:
    """The sites' Keystone listeners in the first free block, trying `preferred` first (a restarted `serve`
    keeps its addresses, so a notebook that cached sites.json keeps working); None when every block is taken."""
    blocks = list(range(1, 255))
    if preferred in blocks:
        blocks.remove(preferred)
        blocks.insert(0, preferred)
    for block in blocks:
        servers = _bind_site_block(block, main)
        if servers is not None:
            return block, servers
    return None


def _answers(address: str, port: int) -> bool:
    """Something accepts TCP connections on address:port (an SSH listener of another process)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((address, port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Testbed:
    """A running testbed: the HTTP endpoint (and, with ssh=True, the SSH nodes) over one world."""

    __test__ = False  # not a pytest test class

    def __init__(self, world: World, server: _Server, thread: threading.Thread):
        self.world = world
        self._server = server
        self._thread = thread
        self._ssh = None
        self.ssh_port: int | None = None  # where this process serves the emulated nodes' SSH
        self.ssh_elsewhere = False  # True: another process (`labctl testbed start`) serves SSH on ssh_port
        self._clouds: dict[str, Any] = {}  # lazily started emulators of other clouds, with their SSH sides
        self._clouds_lock = threading.Lock()
        self.port = server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.site_block: int | None = None  # B of the sites' own addresses 127.40.B.N (None: not served)
        self._site_servers: list[tuple[_SiteServer, threading.Thread]] = []

    @classmethod
    def start(
        cls,
        state_dir: str | os.PathLike | None = None,
        time_scale: float | None = None,
        ssh: bool = True,
        port: int = 0,
        shared_ssh_port: bool = False,
        site_addresses: bool = False,
        site_block: int | None = None,
    ) -> Testbed:
        """Serve the world in this process. SSH listens on a port private to this process, unless
        `shared_ssh_port` (`labctl testbed serve`): then on the world's own port, which it prints.
        `site_addresses`: each site's Keystone also on port 5000 of its own address (block `site_block` if it
        is free), named as `web` in sites.json, for python-chi's `use_site`; skipped when no block is free."""
        world = World(state_dir, time_scale)
        server = _Server(("127.0.0.1", port), _Handler)
        server.stop_event = threading.Event()
        server.world = world
        server.app = App(world, f"http://127.0.0.1:{server.server_address[1]}", server.stop_event)
        tb = cls(world, server, _serve_in_thread(server))
        if site_addresses:
            tb._serve_site_addresses(site_block)
        if ssh:
            try:
                from labctl.testbed.sshd import SSHNodes
            except ImportError as e:
                tb.stop()
                raise RuntimeError(
                    f"the testbed's SSH side (labctl.testbed.sshd) cannot be imported ({e}); "
                    "start the testbed with ssh=False to run without SSH nodes"
                ) from e
            tb.ssh_port = world.ssh_port if shared_ssh_port else _free_port()
            tb._ssh = SSHNodes(world, port=tb.ssh_port, port22=shared_ssh_port or None)
            try:
                tb._ssh.start()
            except BaseException:
                tb._ssh = None
                tb.stop()
                raise
        return tb

    def _serve_site_addresses(self, preferred: int | None) -> None:
        found = _bind_site_addresses(self._server, preferred)
        if found is None:
            return
        self.site_block, servers = found
        self._site_servers = [(server, _serve_in_thread(server)) for server in servers]
        self._server.app.site_webs = {s.name: self.site_web(s.name) for s in cat.SITES.values()}

    # addresses and credentials ---------------------------------------------------------------------
    @property
    def refapi_url(self) -> str:
        return f"{self.endpoint}/refapi"

    def site_url(self, site: str) -> str:
        return f"{self.endpoint}/{cat.resolve_site(site).slug}"

    def site_web(self, site: str) -> str:
        """What sites.json says is the site's `web`: its own address when the testbed serves one, else its
        prefix on the shared endpoint."""
        if self.site_block is None:
            return self.site_url(site)
        return f"http://{SITE_NET}.{self.site_block}.{cat.resolve_site(site).number}"

    def auth_url(self, site: str) -> str:
        """Keystone v3 of `site`: `<web>:5000/v3` as on Chameleon when the site has its own address."""
        if self.site_block is None:
            return f"{self.site_url(site)}/identity/v3"
        return f"{self.site_web(site)}:{KEYSTONE_PORT}/v3"

    def os_env(self, site: str) -> dict[str, str]:
        """OS_* variables for an application credential on `site` (what Chameleon's openrc would set): the
        world's own credential, which only its owner can read (see `labctl.testbed.access`)."""
        return cat.openstack_env(site, self.auth_url(site), self.world.credentials)

    def openrc(self, site: str) -> str:
        s = cat.resolve_site(site)
        lines = [f"# labctl testbed: {s.region} at {self.endpoint} (application credential)"]
        lines += [f"export {k}={v}" for k, v in self.os_env(site).items()]
        lines.append(f"export CHI_RESOURCE_API_URL={self.refapi_url}")
        return "\n".join(lines) + "\n"

    def wait_ssh(self, address: str, port: int, timeout: float = 10.0) -> None:
        """Block until this process serves SSH for the node at address:port (listeners start asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.ssh_elsewhere and _answers(address, int(port)):
                return
            if any((address, int(port)) in ssh.listening() for ssh in self._ssh_sides()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SSH listener on {address}:{port} after {timeout:g}s")
            time.sleep(0.01)

    def slow_ssh_polls(self, seconds: float) -> None:
        """Look for new and gone nodes every `seconds` (a long-running server: less CPU when idle)."""
        for side in self._ssh_sides():
            side.poll_interval = seconds

    def _ssh_sides(self) -> list[Any]:
        sides = [self._ssh] if self._ssh is not None else []
        return sides + [ssh for _, ssh in self._clouds.values() if ssh is not None]

    def gce(self, port: int = 0) -> Any:
        """The emulated Compute Engine over this testbed's state dir (started on first use, on `port`)."""
        from labctl.testbed.gce import start_gce

        return self._cloud("gce", lambda: start_gce(self.world.state_dir, self.world.explicit_scale, port))

    def aws(self, port: int = 0) -> Any:
        """EC2 (moto's server behind labctl's thin layer) over this testbed's state dir (started on first use,
        its front layer on `port`)."""
        from labctl.testbed.aws import start_aws

        return self._cloud("aws", lambda: start_aws(self.world.state_dir / "aws", port=port))

    def _cloud(self, name: str, start: Any) -> Any:
        with self._clouds_lock:
            if name not in self._clouds:
                emulator = start()
                ssh = None
                if self._ssh is not None:
                    from labctl.testbed.sshd import SSHNodes

                    ssh = SSHNodes(emulator.world, port=self.ssh_port).start()
                self._clouds[name] = (emulator, ssh)
            return self._clouds[name][0]

    # lifecycle ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        for emulator, ssh in self._clouds.values():
            if ssh is not None:
                ssh.stop()
            emulator.stop()
        self._clouds.clear()
        if self._ssh is not None:
            try:
                self._ssh.stop()
            finally:
                self._ssh = None
        self._server.stop_event.set()
        for site_server, thread in self._site_servers:
            site_server.shutdown()
            site_server.server_close()
            thread.join(5)
        self._site_servers = []
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Testbed {self.endpoint} world={self.world.state_dir}>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labctl.testbed", description="Serve the emulated Chameleon until Ctrl-C."
    )
    parser.add_argument(
        "--state-dir", help="world directory (default: $LABCTL_TESTBED_DIR or the user state dir)"
    )
    parser.add_argument(
        "--time-scale", type=float, help="multiply every emulated delay (default: the world's)"
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--site", default="chi@tacc", help="site whose openrc to print (default chi@tacc)")
    parser.add_argument("--no-ssh", action="store_true", help="do not start the SSH nodes")
    args = parser.parse_args(argv)
    tb = Testbed.start(args.state_dir, args.time_scale, ssh=not args.no_ssh, port=args.port, shared_ssh_port=True,
                       site_addresses=True)
    scale = tb.world.time_scale
    print(f"# labctl testbed serving {tb.endpoint} (world {tb.world.state_dir}, time scale {scale})")
    print(tb.openrc(args.site), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        tb.stop()
    return 0
