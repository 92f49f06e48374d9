"""One Chameleon site's clients and shared state: openstacksdk and python-blazarclient on one keystoneauth
session, the error table (`translate`), the per-run look-ups (`Memo`) and the shared lists (`Snapshot`). The
per-kind handlers (leases, servers, network, storage) hang off `TABLE` and get this `Session` as their context;
most derive from `Listed`, which finds labctl's resources by their tags (`tags_of`)."""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from labctl import errors, naming
from labctl.errors import CloudError, Conflict, UserError
from labctl.providers import kit
from labctl.providers.base import Found
from labctl.providers.kit import Handler, HandlerTable, Memo, RateLimiter, Snapshot

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site

T = TypeVar("T")

TABLE = HandlerTable("chameleon")
BLAZAR_DATE = "%Y-%m-%d %H:%M"
DELETE_TIMEOUT = 600.0  # seconds a delete waits for servers / volumes to go
IN_USE_TIMEOUT = 60.0  # seconds a delete Neutron refuses "in use" is retried
# Proxy settings requests reads from the environment on every request (its `trust_env`).
PROXY_SETTINGS = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})
# The CA bundle it reads there too, in this order, when the call says only "verify".
CA_BUNDLE_SETTINGS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
# labctl's tags written as text: a Neutron resource's description, a key pair's public-key comment.
TAG_TEXT = re.compile(rf"(?<!\S)({re.escape(naming.PREFIX)}:[a-z_]+)=(\S+)")


def read_environment_once(session: Any) -> None:
    """Read what requests would look up in the environment on every request, once, into the keystoneauth
    `session`: requests scans all of os.environ for proxies per request (a tenth of labctl's CPU per API call in
    a class). With a proxy set, requests keeps reading it (its per-host `no_proxy` rule stays requests')."""
    if any(k.lower() in PROXY_SETTINGS for k in os.environ):
        return
    if session.verify is True:  # True means "the default": requests' default is the environment's bundle
        session.verify = next((os.environ[k] for k in CA_BUNDLE_SETTINGS if os.environ.get(k)), True)
    session.session.trust_env = False


def remember_endpoints(session: Any) -> None:
    """Look each service's endpoint up in the token's catalog once, not on every request: keystoneauth copies the
    whole catalog (`normalize_catalog`'s deepcopy) for every request sent by service type: about a tenth of the
    API path's CPU in a profile of a class, and more with a real site's longer catalog. A token of its own (a new
    `auth_ref`: authenticated again, or invalidated) looks up again; so does any lookup that found nothing."""
    lookup = session.get_endpoint
    found: dict[str, tuple[Any, str]] = {}

    def get_endpoint(auth: Any = None, **kwargs: Any) -> str | None:
        if kwargs.get("endpoint_override"):
            return lookup(auth, **kwargs)
        plugin = auth or session.auth
        key = repr(sorted(kwargs.items()))
        ref, url = found.get(key, (None, None))
        if ref is not None and ref is getattr(plugin, "auth_ref", None):
            return url
        url = lookup(auth, **kwargs)
        ref = getattr(plugin, "auth_ref", None)
        if url and ref is not None:
            found[key] = (ref, url)
        return url

    session.get_endpoint = get_endpoint


class Session:
    def __init__(self, site: Site, credentials: Any, poll_interval: float | None = None,
                 call_retries: int = 6) -> None:
        self.site = site
        self.credentials = credentials
        self.poll_interval = poll_interval if poll_interval is not None else site.poll_interval
        self.call_retries = call_retries
        self._conn: Any = None
        self._blazar: Any = None
        self.lookups = Memo()  # networks, images, flavors: they do not change during a run
        self.limiter = RateLimiter(None)
        # Polls share one list call per round across all deployments on this site (class mode).
        self.poll_lists = Memo()
        # What `find` just said about a resource, for the `create` the engine calls right after it in the same
        # thread (so create does not list again what find listed). Taken once; a missing entry means "look".
        self.just_found = Memo()
        # Project-wide lists for `list_owned` and `inventory`, shared by the deployments a class tears down at
        # once; a deployment's own deletes (time in `deleted_at`) make it fetch again rather than see its old items.
        self.owned_lists = Memo()
        self.deleted_at = Memo()
        # When this session last created (or tried to create) a resource, by (kind, name): a `find` from a shared
        # listing takes only a listing fetched after it, so it sees its own creates.
        self.written_at = Memo()
        self.handlers = TABLE.bind(self)

    def set_rate_limit(self, calls_per_second: float | None) -> None:
        self.limiter = RateLimiter(calls_per_second)

    # -- clients ----------------------------------------------------------------------------------
    @property
    def conn(self) -> Any:
        if self._conn is None:
            import openstack

            c = self.credentials
            self._conn = openstack.connect(
                auth_type=c.auth_type, auth=dict(c.auth), region_name=c.region_name,
                interface=c.interface or "public", identity_api_version="3", load_yaml_config=False,
                load_envvars=False, app_name="labctl",
            )
            self._limit_requests(self._conn.session)
            read_environment_once(self._conn.session)
            remember_endpoints(self._conn.session)
        return self._conn

    def _limit_requests(self, session: Any) -> None:
        """Apply the client-side rate limit to every HTTP request of this adapter's own session (Nova,
        Neutron, Glance, Blazar and Keystone all go through it), not to whole adapter calls."""
        send = session.request

        def limited(*args: Any, **kwargs: Any) -> Any:
            self.limiter.acquire()
            return send(*args, **kwargs)

        session.request = limited

    @property
    def blazar(self) -> Any:
        if self._blazar is None:
            from blazarclient import client as blazar_client

            self._blazar = blazar_client.Client(
                "1", session=self.conn.session, service_type="reservation",
                region_name=self.credentials.region_name, interface="public",
            )
        return self._blazar

    def call(self, what: str, fn: Callable[[], T], *, missing_ok: bool = False, resend: bool = True) -> T:
        """One cloud call, with its errors translated; rate limits and transient faults are retried. With
        `missing_ok`, a 404 is None; `resend=False` for a create without idempotency (see `create_or_find`)."""
        return kit.call(what, fn, translate=self.translate, missing_ok=missing_ok, is_missing=is_not_found,
                        resend=resend, attempts=self.call_retries,
                        backoff=self.poll_interval)  # type: ignore[return-value]

    def translate(self, what: str, exc: Exception) -> Exception:
        from keystoneauth1 import exceptions as ks_exc

        if isinstance(exc, UserError | CloudError):
            return exc
        # openstacksdk wraps keystoneauth's errors (e.g. a 401 at authorize()) in a bare SDKException:
        # look through the chain for the most specific one.
        chain = [exc]
        while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
            chain.append(nxt)
        exc = next((e for e in chain if isinstance(e, ks_exc.ClientException)), exc)
        status = status_of(exc)
        text = error_text(exc)
        where = f"{self.site.name}: {what}"
        if isinstance(exc, ks_exc.Unauthorized) or status == 401:
            return errors.CredentialsError(f"{where}: credentials rejected ({text}); check your openrc or clouds.yaml")
        if isinstance(exc, ks_exc.ConnectFailure | ks_exc.ConnectTimeout):
            return errors.Transient(f"{where}: cannot reach the API ({text})")
        if isinstance(exc, ks_exc.EndpointNotFound):
            return UserError(f"{where}: the site's catalog has no such service ({text})")
        if re.search(r"not enough .* available|no valid host", text, re.I):
            return errors.NoCapacity(f"{where}: {text}")
        if status == 429:  # before the quota's words: its text says "Rate limit exceeded"
            return errors.RateLimited(f"{where}: rate limited ({text})")
        # Before the 409s: Neutron answers a create past the project's quota with a 409 (OverQuota).
        if re.search(r"quota|OverQuota|limit exceeded", text, re.I) or status == 413:
            return errors.QuotaExceeded(f"{where}: quota exceeded ({text})")
        if status == 409 or re.search(r"already exists|already has a floating IP", text, re.I):
            # Blazar answers a taken lease name with a 500 through blazarclient: the text says what it is.
            return Conflict(f"{where}: {text}")
        if status is not None and int(status) >= 500:
            return errors.Transient(f"{where}: server error {status} ({text})")
        if isinstance(exc, TimeoutError | ks_exc.RequestTimeout):
            return errors.Transient(f"{where}: timed out")
        return CloudError(f"{where}: {text}")

    def delete_in_use(self, what: str, fn: Callable[[], Any]) -> None:
        """A delete (404: done), retried while Neutron says the thing is still in use (a port of a server going
        away, a subnet whose router interface is being removed)."""
        kit.retry_in_use(lambda: self.call(what, fn), is_in_use=is_in_use, timeout=IN_USE_TIMEOUT,
                         interval=max(self.poll_interval, 0.05), what=what)

    # -- look-ups ---------------------------------------------------------------------------------
    def lookup(self, key: str, what: str, fn: Callable[[], Any]) -> Any:
        return self.lookups.get(key, lambda: self.call(what, fn))

    def network(self, public: bool = False) -> Any:
        """The site's shared network, or its public one (floating IPs, router gateways); looked up once."""
        name = self.site.public_network if public else self.site.network
        net = self.lookup(f"network:{name}", f"find network {name}", lambda: self.conn.network.find_network(name))
        if net is None:
            raise CloudError(f"{self.site.name}: no network named '{name}'")
        return net

    def image(self, name: str) -> Any:
        image = self.lookup(f"image:{name}", f"find image {name}", lambda: self.conn.image.find_image(name))
        if image is None:
            raise UserError(f"{self.site.name}: image '{name}' not found at this site")
        return image

    def flavor(self, name: str) -> Any:
        return self.lookup(f"flavor:{name}", f"find flavor {name}",
                           lambda: self.conn.compute.find_flavor(name, ignore_missing=True))

    def found_before_create(self, res: Resource, plan: Plan) -> Found | None:
        """What `find` said just before this create, else a fresh look (a GET of its own, no shared list)."""
        missing = object()
        found = self.just_found.pop((plan.deployment, res.key), missing)
        return self.handlers[res.kind].look(res, plan) if found is missing else found  # type: ignore[attr-defined]

    def wrote(self, kind: str, name: str, deployment: str) -> None:
        """This session created (or may have created) `name`: its next `find`, and the next look at what the
        deployment owns (or at every deployment's: `inventory`), must use a fresher listing."""
        now = time.monotonic()
        for key in ((kind, name), deployment, None):
            self.written_at.put(key, now)

    def changed(self, deployment: str | None) -> float:
        """When this session last created something of `deployment` (None: of any deployment)."""
        return float(self.written_at.peek(deployment, -1e18))

    def written(self, kind: str, name: str) -> float:
        return float(self.written_at.peek((kind, name), -1e18))

    # -- lists ------------------------------------------------------------------------------------
    def raw_list(self, service: str, path: str, key: str, params: Mapping[str, Any] | None = None,
                 keep: Keep | None = None) -> list[Item]:
        """Every item of one list API as plain JSON (`Item`s), following the API's next links: the lean path
        for the lists a class polls and shares. openstacksdk builds a Resource per listed item, which cost most of
        labctl's CPU at 200 students (a server list of 200 took 0.2 s of CPU). With `keep`, each item holds only
        those fields (`kept`): the lists stay in memory between poll rounds, a class's hundreds of items each."""
        from openstack import exceptions as sdk_exc

        proxy = getattr(self.conn, service)
        items: list[Item] = []
        project = kept(keep)
        as_read = _kept_type(frozenset(kept_fields(keep))) if keep is not None else Item  # `read_kept` projected it
        url: str | None = path
        query: Mapping[str, Any] | None = params
        for _ in range(10_000):  # a bound on pages, never reached
            if url is None:
                break
            resp = proxy.get(url, params=query)
            sdk_exc.raise_from_response(resp)
            body, make = read_kept(resp.content, key, keep), as_read
            if body is None:  # no `keep`, or not the usual shape: the whole JSON, as it is
                body, make = resp.json(), project
            items.extend(make(x.get(key[:-1], x) if key == "keypairs" else x) for x in body.get(key) or [])
            url = next((link["href"] for link in body.get(f"{key}_links") or [] if link.get("rel") == "next"), None)
            query = None  # the next link carries the query
        return items

    def raw_create(self, service: str, path: str, key: str, body: Mapping[str, Any],
                   **top: Any) -> Item:
        """One create as plain JSON (`POST path {key: body, **top}`), the answer's `key` as an `Item`: the lean path
        for the creates every environment of a class makes. openstacksdk builds a Resource from the request and
        again from the answer (a server's costs about 3 ms of CPU each time)."""
        from openstack import exceptions as sdk_exc

        resp = getattr(self.conn, service).post(path, json={key: dict(body), **top})
        sdk_exc.raise_from_response(resp)
        return Item(resp.json().get(key) or {})

    def project_list(self, what: str, fetch: Callable[[], Any], plan: Plan | None, *,
                     newer_than: float = -1e18) -> Any:
        """Everything of one kind in the project, from a list shared with the other deployments of a class (their
        finds before creating, their teardowns); fetched again after `plan`'s own deletes, and when the list
        was fetched before `newer_than` (a `time.monotonic()` value)."""
        snap = self.owned_lists.get(what, lambda: Snapshot(max(self.poll_interval, 1.0), self.poll_interval / 2))
        if plan is not None:
            newer_than = max(newer_than, self.deleted_at.peek(plan.deployment, -1e18))
        return snap.get(lambda: self.call(f"list {what}", fetch), newer_than=newer_than)

    def polled(self, what: str, fetch: Callable[[], Any]) -> Any:
        """The poll round's one list of `what`, shared by every thread that polls."""
        snap = self.poll_lists.get(what, lambda: Snapshot(self.poll_interval * 0.9))
        return snap.get(lambda: self.call(f"poll {what}", fetch))

    def mark_deleted(self, plan: Plan) -> None:
        self.deleted_at.put(plan.deployment, time.monotonic())  # its next list_owned must be fresh


class Listed(Handler):
    """A kind whose items carry labctl's tags (`tags`), on openstacksdk's proxy `conn.<service>` as
    `<sdk>s()` / `delete_<sdk>()`. `listing` is every item of it in the project (one list shared by the
    deployments a class tears down at once), `found` what the engine sees of one item: `owned` keeps the
    deployment's, `inventory` every deployment's, so `down` and the leak audit agree on what is labctl's.
    `find` takes the deployment's item of the resource's name, the same of twins for every run (`rank`)."""

    ctx: Session
    service = "network"
    sdk = ""
    filters: dict[str, Any] = {}  # of every list call (details=True)
    # The list API read as plain JSON (`Session.raw_list`): its path under the service and its body's key.
    # Empty: through openstacksdk.
    raw: tuple[str, str] = ("", "")
    keep: Keep = {}  # what handlers read of a raw-listed item besides `KEEP_ALWAYS` (`kept`)
    gone: tuple[str, ...] = ()  # statuses of items on their way out: neither found nor owned

    def method(self, verb: str) -> Any:
        """openstacksdk's `conn.<service>.<verb>_<sdk>`, or its list `<sdk>s` (`verb` "")."""
        return getattr(getattr(self.ctx.conn, self.service), f"{verb}_{self.sdk}" if verb else f"{self.sdk}s")

    def api(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        """One translated call of `method(verb)`; a list comes as a list."""
        fn = self.method(verb)
        what = f"{verb or 'list'} {self.kind}"
        return self.ctx.call(what, lambda: fn(*args, **kwargs) if verb else list(fn(**kwargs)))

    def fetch_all(self) -> list[Any]:
        if self.raw[0]:
            return self.ctx.raw_list(self.service, *self.raw, keep=self.keep)
        return list(self.method("")(**self.filters))

    def shared(self, plan: Plan | None, newer_than: float = -1e18) -> Sequence[Any]:
        """Every item of this kind in the project, as fetched: one list the class's deployments share."""
        return self.ctx.project_list(f"{self.kind}s", self.fetch_all, plan, newer_than=newer_than)

    def listing(self, plan: Plan | None, newer_than: float = -1e18) -> Sequence[Any]:
        return [i for i in self.shared(plan, newer_than) if getattr(i, "status", None) not in self.gone]

    @functools.cached_property
    def by_deployment(self) -> ByDeployment:
        return ByDeployment(self.tags, self.gone)

    def named(self, name: str, plan: Plan, *, shared: bool = False, newer_than: float = -1e18) -> list[Any]:
        """The deployment's items of this name, best first: from one GET filtered by name, or (`shared`) from
        the project's listing shared by the class, fetched after `newer_than` and this session's last create
        of the name."""
        if shared:
            since = max(newer_than, self.ctx.written(self.kind, name))
            mine = [i for i in self.by_deployment(self.shared(plan, since), plan.deployment) if i.name == name]
        else:
            items = self.api("", name=self.query_name(name), **self.filters)
            mine = [i for i in items
                    if deployment_of(i) == plan.deployment and getattr(i, "status", None) not in self.gone]
        return sorted(mine, key=self.rank)

    def query_name(self, name: str) -> str:
        """The `name` filter that asks the API for exactly `name`."""
        return name

    def rank(self, item: Any) -> tuple[Any, ...]:
        """A healthy one first (an earlier run's ERROR twin is swept by `down`), then the oldest."""
        return (str(getattr(item, "status", "")).lower() == "error", str(item.created_at or ""), item.id)

    # `find` (the engine's, before a create) reads the listing the class shares when `shared_find`: one list
    # call serves every deployment instead of a GET each. A create's own checks (after a lost answer, a conflict)
    # `look` with a GET of their own.
    shared_find = False

    def find(self, res: Resource, plan: Plan) -> Found | None:
        return self.lookup(res, plan, shared=self.shared_find)

    def look(self, res: Resource, plan: Plan) -> Found | None:
        return self.lookup(res, plan, shared=False)

    def lookup(self, res: Resource, plan: Plan, *, shared: bool) -> Found | None:
        mine = self.named(res.name, plan, shared=shared)
        return self.found(mine[0]) if mine else None

    def found(self, item: Any) -> Found:
        return Found(self.kind, item.id, item.name or "")

    def fields(self, res: Resource, plan: Plan, deps: Mapping[str, Found]) -> dict[str, Any]:
        """What `create` sends besides the name and the deployment's description."""
        raise CloudError(f"labctl does not create {self.kind} resources here")

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        found = self.ctx.found_before_create(res, plan)
        if found is not None and found.status != "error":
            return found
        fields = self.fields(res, plan, deps)
        return self.found(self.api("create", name=res.name, description=description(plan.deployment), **fields))

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        for f in found:
            self.ctx.delete_in_use(f"delete {self.kind}", lambda f=f: self.method("delete")(
                f.cloud_id, ignore_missing=True))

    def tags(self, item: Any) -> dict[str, str]:
        return tags_of(item)

    def owned(self, plan: Plan) -> list[Found]:
        items = self.shared(plan, self.ctx.changed(plan.deployment))
        return [self.found(i) for i in self.by_deployment(items, plan.deployment)]

    def inventory(self) -> list[Found]:
        found = []
        for item in self.listing(None, self.ctx.changed(None)):
            if naming.TAG_DEPLOYMENT in (tags := self.tags(item)):
                found.append(self.found(item))
                found[-1].attrs.update(deployment=tags[naming.TAG_DEPLOYMENT], owner=tags.get(naming.TAG_OWNER),
                                       created=iso_utc(getattr(item, "created_at", None)))
        return found


class ByDeployment:
    """The items of a fetched list grouped by their deployment tag, once per list. A class's hundreds of
    deployments read the same few lists; each scanning them whole, tags parsed per item, cost O(students²):
    a tenth of labctl's CPU in a class of 500. The last few lists are kept (a kind's project list and its poll
    list alternate)."""

    KEPT = 4

    def __init__(self, tags: Callable[[Any], Mapping[str, str]], gone: Sequence[str] = ()) -> None:
        self._tags = tags
        self._gone = gone
        self._lists: tuple[tuple[Sequence[Any], dict[str | None, list[Any]]], ...] = ()

    def __call__(self, items: Sequence[Any], deployment: str) -> list[Any]:
        """The deployment's items of `items` (none on its way out, as `Listed.gone` says)."""
        return list(self._groups(items).get(deployment, ()))

    def _groups(self, items: Sequence[Any]) -> dict[str | None, list[Any]]:
        kept = self._lists  # replaced whole, never changed in place: threads read it without a lock
        for listed, groups in kept:
            if listed is items:
                return groups
        groups = {}
        for item in items:
            if getattr(item, "status", None) not in self._gone:
                groups.setdefault(self._tags(item).get(naming.TAG_DEPLOYMENT), []).append(item)
        self._lists = ((items, groups), *kept[: self.KEPT - 1])
        return groups


# -- helpers ---------------------------------------------------------------------------------------
class Item(dict):  # type: ignore[type-arg]
    """One listed item as the API's JSON, read like an openstacksdk Resource (`item.status`; None if absent;
    `created_at` is Nova's `created`)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name == "created_at" and name not in self:
            return self.get("created")
        return self.get(name)


class KeptItem(Item):
    """A listed item holding only `fields` (`kept`): reading another field is a bug, not a None."""

    __slots__ = ()
    fields: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        if name not in self.fields and not name.startswith("__"):
            raise AttributeError(f"{name!r} is not kept in this listing (add it to the handler's `keep`)")
        return super().__getattr__(name)


# What a listing keeps of each item: a field, and for a list of objects (a group's rules) the fields kept of each.
Keep = Mapping[str, "tuple[str, ...] | None"]
KEEP_ALWAYS: Keep = dict.fromkeys(("id", "name", "status", "description", "metadata", "created", "created_at"))


@functools.cache
def _kept_type(fields: frozenset[str]) -> type[KeptItem]:
    return type("KeptItem", (KeptItem,), {"__slots__": (), "fields": fields})


def kept_fields(keep: Keep) -> Keep:
    return {**KEEP_ALWAYS, **keep}


def kept(keep: Keep | None) -> Callable[[Mapping[str, Any]], Item]:
    """What makes a listed object an `Item` holding only the fields in `keep` and `KEEP_ALWAYS` (a list of objects
    only the sub-fields named); all of it without `keep`."""
    if keep is None:
        return Item
    fields = kept_fields(keep)
    cls = _kept_type(frozenset(fields))

    def project(item: Mapping[str, Any]) -> Item:
        return cls({name: value if sub is None or not isinstance(value, list) else
                    [{k: v for k, v in x.items() if k in sub} if isinstance(x, dict) else x for x in value]
                    for name, sub in fields.items() if (value := item.get(name, _MISSING)) is not _MISSING})

    return project


_MISSING = object()


def read_kept(content: bytes, key: str, keep: Keep | None) -> dict[str, Any] | None:
    """One list page's body with only the kept fields of each item under `key` (as `kept` keeps them), decoded in
    one pass by msgspec: the whole JSON is never built (a class's server list polls were most of labctl's JSON
    CPU). None without `keep`, or when the page is not of the usual shape (a kept list that is not a list of
    objects, a key pair not wrapped, not JSON at all): the caller then reads it whole, as before."""
    if keep is None:
        return None
    import msgspec

    try:
        return _page_decoder(key, tuple(kept_fields(keep).items())).decode(content)  # type: ignore[no-any-return]
    except msgspec.MsgspecError:
        return None


@functools.cache
def _page_decoder(key: str, fields: tuple[tuple[str, tuple[str, ...] | None], ...]) -> Any:
    from typing import TypedDict

    import msgspec

    def object_of(names: Mapping[str, Any], total: bool = False) -> Any:  # unknown keys are skipped, not decoded
        return TypedDict("Kept", dict(names), total=total)  # type: ignore[operator]

    item = object_of({name: Any if sub is None else list[object_of(dict.fromkeys(sub, Any))]  # type: ignore[misc]
                      for name, sub in fields})
    if key == "keypairs":  # Nova wraps each: {"keypair": {...}}
        item = object_of({"keypair": item}, total=True)
    return msgspec.json.Decoder(object_of({key: list[item], f"{key}_links": list[dict[str, Any]]}))


def status_of(exc: Exception) -> int | None:
    # blazarclient's exceptions carry the HTTP status in kwargs["code"]; their `code` attribute is always 500.
    kwargs = getattr(exc, "kwargs", None)
    return getattr(exc, "status_code", None) or getattr(exc, "http_status", None) or (
        kwargs.get("code") if isinstance(kwargs, dict) else None) or getattr(
        exc, "code", None) or getattr(getattr(exc, "response", None), "status_code", None)


def is_not_found(exc: Exception) -> bool:
    """openstacksdk's NotFoundException, or a blazarclient error with a 404 (its `code` attribute is real)."""
    if type(exc).__name__ == "NotFoundException":
        return True
    kwargs = getattr(exc, "kwargs", None)
    return type(exc).__module__.startswith("blazarclient") and 404 in (
        getattr(exc, "code", None), kwargs.get("code") if isinstance(kwargs, dict) else None)


def is_in_use(exc: Exception) -> bool:
    return isinstance(exc, Conflict) and bool(re.search(r"in use|still has ports", str(exc), re.I))


def description(deployment: str, node: str | None = None) -> str:
    """labctl's tags as text, for what has no metadata (Neutron descriptions)."""
    text = f"{naming.TAG_DEPLOYMENT}={deployment}"
    return f"{text} {naming.TAG_NODE}={node}" if node else text


def tags_of(item: Any) -> dict[str, str]:
    """labctl's tags on an OpenStack resource: its metadata (Nova, Cinder), else its description (Neutron) or
    public key's comment (Nova key pairs) read as `description` writes them. {} for a resource without them."""
    meta = getattr(item, "metadata", None)
    if meta:
        return {str(k): str(v) for k, v in meta.items() if str(k).startswith(f"{naming.PREFIX}:")}
    text = getattr(item, "description", None) or getattr(item, "public_key", None)
    return dict(TAG_TEXT.findall(text)) if isinstance(text, str) else {}


def deployment_of(item: Any) -> str | None:
    return tags_of(item).get(naming.TAG_DEPLOYMENT)


def parse_lease_date(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise CloudError(f"unexpected lease date format: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def iso_utc(text: str | None) -> str | None:
    """A cloud's timestamp (ISO 8601 with or without a zone, Blazar's "YYYY-MM-DD HH:MM:SS") in ISO 8601, UTC."""
    try:
        return parse_lease_date(text).astimezone(UTC).isoformat() if text else None
    except CloudError:
        return None


def error_text(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    text = str(details or exc) or type(exc).__name__
    return text.replace("ERROR: ", "").strip().splitlines()[0][:300]
