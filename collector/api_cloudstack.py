"""CloudStack's API on /client/api: listUsageRecords and listUsageTypes as CloudStack answers them.

GET or POST (a form body), XML unless response=json, CloudStack's paging and error codes. Every
read is narrowed to the caller's accounts (api_auth.current_principal); a scoped caller that
names an account, domain or project outside them gets CloudStack's permission error (531).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace

from flask import Flask, Response, request
from sqlalchemy.engine import Connection

from kvmeter.collector import cloudstack_render
from kvmeter.collector.api_auth import Principal, current_principal
from kvmeter.collector.api_errors import cloudstack_error, cloudstack_wants_xml, request_values
from kvmeter.collector.cloudstack_params import (
    ACCOUNT_ERROR,
    DEFAULT_PAGE_SIZE,
    PARAM_ERROR,
    CloudStackError,
    UsageRecordsRequest,
    parse_list_usage_records,
    unknown_account,
    unknown_entity,
)
from kvmeter.collector.cloudstack_render import CS_PERMISSION_DENIED
from kvmeter.collector.owner_directory import OwnerDirectory
from kvmeter.collector.report import record_facts
from kvmeter.collector.store import Store, UsageFilter, UsagePager, UsageRow
from kvmeter.collector.store.pages import account_has_usage
from kvmeter.collector.store.reconciliation import load_names, load_snapshot

UNKNOWN_COMMAND = "The given command does not exist or it is not available for user"


DIRECTORY_TTL_S = 10.0  # names and <metadata> change seldom; a page must not reread them all


def register(app: Flask, store: Store, page_size: int = DEFAULT_PAGE_SIZE) -> None:
    """page_size: default.page.size ([api] cloudstack_page_size)."""
    pager = UsagePager()
    directory = _DirectoryCache(store)

    @app.route("/client/api", methods=["GET", "POST"])
    def cloudstack_api() -> Response:
        command = request.values.get("command", "")
        try:
            args = _params()
            if command == "listUsageRecords":
                return _list_usage_records(store, pager, directory, args, page_size)
            if command == "listUsageTypes":
                records = cloudstack_render.usage_type_records()
                return _list_response("listusagetypesresponse", "usagetype", len(records), iter(records))
            raise CloudStackError(432, UNKNOWN_COMMAND)
        except CloudStackError as exc:
            return cloudstack_error(command, exc.code, exc.text, exc.cs_code)


def _params() -> dict[str, str]:
    """Query and form parameters by lower-cased name (CloudStack signs them lower-cased); a
    name given twice is refused rather than guessed."""
    args: dict[str, str] = {}
    for name, value in request_values():
        key = name.lower()
        if key in args:
            raise CloudStackError(PARAM_ERROR, f"parameter {key} is given more than once")
        args[key] = value
    return args


def _list_usage_records(
    store: Store, pager: UsagePager, directories: _DirectoryCache, args: Mapping[str, str], page_size: int
) -> Response:
    req = parse_list_usage_records(args, page_size)
    with store.read() as conn:  # one read: count and page agree
        directory = directories.get(conn)
        principal = current_principal()
        req = known_case(req, directory, lambda account: account_has_usage(conn, account))
        if principal.accounts is None:  # a scoped caller gets 531 for whatever is not its own
            refuse_unknown(req, directory, lambda account: account_has_usage(conn, account))
        flt = UsageFilter(
            start_ms=req.start_ms,
            end_ms=req.end_ms,
            ends_by_ms=req.end_ms,
            accounts=visible_accounts(req, principal, directory),
            usage_type=req.usage_type,
            resource=req.usage_id,
            resource_any_case=True,  # CloudStack finds a resource by its uuid in any case
            keyword=req.keyword,
            attributed_only=True,  # bytes no account owns are no CloudStack account's usage
        )
        if req.empty_range:
            flt = UsageFilter(0, 0, accounts=frozenset())
        count = pager.count(conn, flt, store.finalized_through(conn, lock=False))
        if req.limit is not None:
            rows: Iterator[UsageRow] = iter(pager.page(conn, flt, limit=req.limit, offset=req.offset))
    if req.limit is None:  # pagesize=-1: every record, streamed a page at a time
        rows = _all_rows(store, flt)
    records = (cloudstack_render.usage_record(record_facts(r, directory), include_tags=req.include_tags,
                                              old_format=req.old_format) for r in rows)  # fmt: skip
    return _list_response("listusagerecordsresponse", "usagerecord", count, records, stream=req.limit is None)


def visible_accounts(
    req: UsageRecordsRequest, principal: Principal, directory: OwnerDirectory
) -> frozenset[str] | None:
    """The accounts the answer may hold (None: every account): what the request names, within
    what the caller may see. Naming anything outside that is CloudStack's PermissionDenied."""
    visible = principal.accounts
    requested: frozenset[str] | None = None
    if req.project_id is not None:
        requested = directory.accounts_of_project(req.project_id)
    elif req.account_id is not None:
        requested = frozenset({req.account_id})
    elif req.account_name is not None:
        # By name (known from <metadata>); the event bus only knows uuids, so a uuid works too.
        requested = directory.accounts_named(req.account_name, req.domain_id)
        if req.domain_id is None:
            requested |= {req.account_name}
    if req.domain_id is not None:
        # The caller's own domain: one its credential names or a subdomain of one (CloudStack:
        # the caller's domain or a child of it, with accounts or not) or one of its accounts',
        # else one holding only its accounts (below)
        named_own = (
            req.domain_id in principal.domains
            or directory.is_subdomain(req.domain_id, principal.domains)
            or any(directory.owner(a).domain_id == req.domain_id for a in visible or ())
        )
        # With accountid or projectid, CloudStack's answer is that account's records in the
        # domain's tree: kvmeter keeps to the domain alone when it lacks the tree
        recursive = req.recursive
        found = directory.accounts_in_domain(req.domain_id, recursive=recursive)
        if found is None and (req.account_id is not None or req.project_id is not None):
            found = directory.accounts_in_domain(req.domain_id)
        if found is None and visible is not None and not named_own:
            # 531 before the domain's path is looked at: whether it exists or not
            raise _denied("Invalid Domain Id or Account")
        if found is None:
            raise CloudStackError(
                PARAM_ERROR,
                "isrecursive=true with domainid needs the domain's path, which kvmeter learns from "
                "CloudStack's API (the reconciler): not known for this domain",
            )
        in_domain = found
        requested = in_domain if requested is None else requested & in_domain
        own_domain = named_own or (in_domain and visible and in_domain <= visible)
        if visible is not None and not own_domain:
            raise _denied("Invalid Domain Id or Account")
        if recursive and req.account_name is not None and req.account_id is None and req.project_id is None:
            # CloudStack (UsageServiceImpl.getUsageRecords): the name must find an account in the
            # domain, and then isrecursive lists the domain's whole tree, not that account
            if visible is not None and not requested & visible:
                raise _denied("Users are only allowed to list usage records for their own account.")
            requested = in_domain if requested else frozenset()
    if visible is None:
        return requested
    if req.recursive and not principal.domains:
        raise _denied("Users are not allowed to list usage records recursively.")
    if requested is None:
        return visible
    allowed = requested & visible
    names_accounts = req.account_id is not None or req.project_id is not None or req.account_name is not None
    if names_accounts and (not allowed or (req.account_name is None and not requested <= visible)):
        raise _denied("Users are only allowed to list usage records for their own account.")
    return allowed


def refuse_unknown(
    req: UsageRecordsRequest, directory: OwnerDirectory, has_usage: Callable[[str], bool]
) -> None:
    """CloudStack's 431 for a domain or account that does not exist, once kvmeter knows which
    exist: the domains and accounts CloudStack's API listed to the reconciler (kept after their
    removal, as CloudStack finds removed ones too), those <metadata> named, and accounts with
    records. Before the reconciler has listed them, an unknown one stays an empty answer (it
    may exist with no usage yet). Projects are never all known: an unknown one is empty."""
    if req.domain_id is not None and directory.domains_listed and not directory.knows_domain(req.domain_id):
        raise unknown_entity("domainid", req.domain_id)
    if not directory.accounts_listed or req.project_id is not None:
        return  # with a project CloudStack looks at neither account nor accountid

    def exists(account: str) -> bool:
        return directory.knows_account(account) or has_usage(account)

    if req.account_id is not None:
        if not exists(req.account_id):
            raise unknown_entity("accountid", req.account_id)
    elif req.account_name is not None:
        named = directory.accounts_named(req.account_name, req.domain_id)
        if not named and (req.domain_id is not None or not exists(req.account_name)):
            raise unknown_account(req.account_name, req.domain_id)


def known_case(
    req: UsageRecordsRequest, directory: OwnerDirectory, has_usage: Callable[[str], bool]
) -> UsageRecordsRequest:
    """accountid and domainid as kvmeter keeps them when given in another case: CloudStack's
    uuid columns compare without case (and are unique so), so it finds them. The same account
    or domain, never another: what the caller may see is decided after."""
    account_id, domain_id = req.account_id, req.domain_id
    if account_id is not None and not directory.knows_account(account_id) and not has_usage(account_id):
        account_id = directory.known_id(account_id)
        if account_id == req.account_id and has_usage(account_id.lower()):  # records only
            account_id = account_id.lower()
    if domain_id is not None:
        domain_id = directory.known_id(domain_id, domain=True)
    return replace(req, account_id=account_id, domain_id=domain_id)


class _DirectoryCache:
    """The owner directory (hints and the reconciler's names), read again every DIRECTORY_TTL_S."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.clock = store, clock
        self._lock = threading.Lock()
        self._kept: tuple[float, OwnerDirectory] | None = None

    def get(self, conn: Connection) -> OwnerDirectory:
        now = self.clock()
        kept = self._kept
        if kept is not None and now - kept[0] < DIRECTORY_TTL_S:
            return kept[1]
        directory = load_directory(self.store, conn)
        with self._lock:
            self._kept = (now, directory)
        return directory


def load_directory(store: Store, conn: Connection) -> OwnerDirectory:
    """What the store knows of owners and resources: the VMs' <metadata> (owner hints) and the
    reconciler's names and last snapshot (also for the CLI's cloudstack format)."""
    names = load_names(conn)
    hinted = OwnerDirectory.from_hints(*store.owner_hints_dated(conn))
    directory = hinted.with_names(
        names.accounts, names.domains, names.domains_listed_ms, names.accounts_listed_ms
    )
    return directory.with_snapshot(load_snapshot(conn), names.offerings)


def _denied(text: str) -> CloudStackError:
    return CloudStackError(ACCOUNT_ERROR, text, CS_PERMISSION_DENIED)


def _all_rows(store: Store, flt: UsageFilter) -> Iterator[UsageRow]:
    """Every matching record, one short read per page (memory stays one page)."""
    after = None
    while True:
        page = store.usage_page(flt, limit=DEFAULT_PAGE_SIZE, after=after)
        yield from page.rows
        if len(page.rows) < DEFAULT_PAGE_SIZE:
            return
        after = page.after


def _list_response(
    name: str, object_name: str, count: int, records: Iterator[Mapping[str, object]], *, stream: bool = False
) -> Response:
    """One page is sent whole (with a length); an unlimited answer streams."""
    xml = cloudstack_wants_xml()
    body = cloudstack_render.list_body(name, object_name, count, records, xml=xml)
    content_type = cloudstack_render.XML_CONTENT_TYPE if xml else cloudstack_render.JSON_CONTENT_TYPE
    return Response(body if stream else "".join(body), content_type=content_type)
