"""Admin routes: list, add and remove instances while serving (``/admin/instances``).

They need ``Authorization: Bearer TOKEN`` with the token from ``--admin-token`` (or
``$OMNI_PROXY_ADMIN_TOKEN``); without a configured token they answer 403. The listing shows
instance URLs and their last errors, which the public endpoints never do.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.server.errors import client_error
from proxy.server.front import Answer, Request, Routes
from proxy.server.instances import normalize_url
from proxy.wire.openai import RequestError, parse_json_body

ADMIN_BODY_BYTES = 1 << 16


def _json(document: Any, status: int = 200) -> Answer:
    return Answer(status, json.dumps(document).encode())


class AdminRoutes:
    def __init__(self, token: str | None, mode: str, listing: Callable[[], dict[str, Any]],
                 add: Callable[[str, str, str | None], dict[str, Any]], remove: Callable[[str], Awaitable[Any]]):
        self.token = token
        self.mode = mode
        self.listing = listing
        self.add = add
        self.remove = remove

    def install(self, routes: Routes) -> None:
        routes.add("GET", "/admin/instances", self.list_instances)
        routes.add("POST", "/admin/instances", self.add_instance)
        routes.add("DELETE", "/admin/instances", self.remove_instance)

    def _denied(self, request: Request) -> Answer | None:
        if not self.token:
            return client_error("admin endpoints are disabled: start omni-proxy serve with --admin-token "
                                "(or OMNI_PROXY_ADMIN_TOKEN)", 403, None, "permission_error")
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self.token.encode()):
            return client_error("admin endpoints need the header 'Authorization: Bearer <admin token>'", 401, None,
                                "authentication_error")
        return None

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = parse_json_body(await request.read(ADMIN_BODY_BYTES))
        except (RequestError, ValueError):
            body = {}
        if not body and request.query.get("url"):
            body = dict(request.query)
        return body

    async def list_instances(self, request: Request) -> Answer:
        return self._denied(request) or _json(self.listing())

    async def add_instance(self, request: Request) -> Answer:
        denied = self._denied(request)
        if denied:
            return denied
        body = await self._body(request)
        roles = ("prefill", "decode") if self.mode == "pd" else ("collocated",)
        role = body.get("role", roles[0] if len(roles) == 1 else None)
        if role not in roles:
            return client_error(f"field 'role' must be one of {', '.join(roles)} in {self.mode} mode, got {role!r}",
                                400, None, param="role")
        kv_endpoint = body.get("kv_events")
        if kv_endpoint is not None and (not isinstance(kv_endpoint, str)
                                        or not kv_endpoint.startswith(("tcp://", "ipc://"))):
            return client_error(f"field 'kv_events' must be a ZMQ address like tcp://HOST:PORT, got {kv_endpoint!r}",
                                400, None, param="kv_events")
        try:
            described = self.add(normalize_url(str(body.get("url", ""))), role, kv_endpoint)
        except ValueError as exc:
            return client_error(str(exc), 400, None, param="url")
        return _json(described, 201)

    async def remove_instance(self, request: Request) -> Answer:
        denied = self._denied(request)
        if denied:
            return denied
        body = await self._body(request)
        try:
            inst = await self.remove(normalize_url(str(body.get("url", ""))))
        except ValueError as exc:
            return client_error(str(exc), 400, None, param="url")
        except KeyError as exc:
            return client_error(str(exc.args[0]), 404, None, param="url")
        return _json({"removed": inst.url, "role": inst.role})
