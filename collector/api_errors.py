"""Error bodies of the API: JSON for /v1 and the rest, CloudStack's shape on /client/api.

install() makes every status the app answers with a JSON body, never Werkzeug's HTML: refused
parameters (BadRequest, 400 / CloudStack's 431), Werkzeug's own errors (404, 405, 413, ...) and
anything unexpected (logged with its traceback, 500 / CloudStack's 530, no detail to the caller).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from flask import Flask, Response, jsonify, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from kvmeter.collector import cloudstack_render
from kvmeter.collector.api_params import BadRequest

__all__ = ["CLOUDSTACK_PATH", "MAX_BODY_BYTES", "BadRequest", "cloudstack_error", "error", "install"]

log = logging.getLogger(__name__)

CLOUDSTACK_PATH = "/client/api"
MAX_BODY_BYTES = 64 * 1024  # the largest body any endpoint reads (a signed POST form)
# CloudStack's ApiErrorCode for the statuses this API answers on /client/api.
PARAM_ERROR = 431
INTERNAL_ERROR = 530


def error(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


# The commands /client/api answers, by name (case matters, as in CloudStack's command map).
CLOUDSTACK_COMMANDS = ("listUsageRecords", "listUsageTypes")
# A name shaped like a CloudStack API command: a lower-case verb, then camel case
# (listVirtualMachines). Not `listusagerecords`: CloudStack's command map is case-sensitive.
_COMMAND_NAME = re.compile(r"[a-z]+[A-Z][A-Za-z0-9]*")


def cloudstack_error(
    command: str, code: int, text: str, cs_code: int | None = cloudstack_render.CS_SERVER_API
) -> Response:
    """CloudStack's ExceptionResponse, status = errorcode, in the format the request asked for:
    `response=json`, else XML (CloudStack's default). cs_code None: no cserrorcode (an error
    not raised as an exception, such as ApiServlet's 401). Named as ApiServer.getSerializedApiError
    names it: `errorresponse` for a 432 and for a name that is no command, else the command's
    response, e.g. a refused (401) listVirtualMachines is `listvirtualmachinesresponse`.
    CloudStack's whole command list is not kvmeter's to know: a name shaped like a command is
    taken for one."""
    is_command = command in CLOUDSTACK_COMMANDS or _COMMAND_NAME.fullmatch(command) is not None
    name = f"{command.lower()}response" if is_command and code != 432 else "errorresponse"
    xml = cloudstack_wants_xml()
    body = cloudstack_render.error_body(name, code, cs_code, text, xml=xml)
    content_type = cloudstack_render.XML_CONTENT_TYPE if xml else cloudstack_render.JSON_CONTENT_TYPE
    return Response(body, status=code, content_type=content_type)


def cloudstack_wants_xml() -> bool:
    """CloudStack answers JSON only for response=json (any case), else XML."""
    values = [v for k, v in request_values() if k.lower() == "response"]
    return not (values and values[0].lower() == "json")


def request_values() -> list[tuple[str, str]]:
    """Every (name, value) of the query and of a POST form: what CloudStack reads and signs
    (the query alone when the body is refused, e.g. too large)."""
    values: MultiDict[str, str]
    try:
        values = request.values
    except HTTPException:
        values = request.args
    return [(name, value) for name in values for value in values.getlist(name)]


def _for_path(status: int, message: str, *, cloudstack_code: int | None = None) -> Response:
    """The error in the shape of the path asked: CloudStack's on /client/api, ours elsewhere."""
    if request.path != CLOUDSTACK_PATH:
        return error(status, message)
    command = next((v for k, v in request.args.items() if k.lower() == "command"), "")
    name = command if command.isascii() and command.isalnum() else "api"
    return cloudstack_error(name, cloudstack_code or status, message)


def install(app: Flask, body_limits: Mapping[str, int] | None = None) -> None:
    """Error handlers and the request-body limit (before any other request hook and route):
    MAX_BODY_BYTES, or body_limits' for its paths (a path that takes whole events)."""
    body_limits = dict(body_limits or {})
    # No redirects (an HTML body from Werkzeug's routing) for // in a path: a JSON 404 instead.
    app.url_map.merge_slashes = False

    @app.before_request
    def _body_limit() -> None:
        limit = body_limits.get(request.path, MAX_BODY_BYTES)
        if (request.content_length or 0) > limit:
            raise RequestEntityTooLarge(f"request bodies are limited to {limit} bytes")

    @app.after_request
    def _options(response: Response) -> Response:
        # Flask answers OPTIONS itself with an empty text/html 200: say it with no body at all.
        if request.method == "OPTIONS" and response.status_code == 200 and not response.get_data():
            response.status_code = 204
            del response.headers["Content-Type"]
        return response

    @app.errorhandler(BadRequest)
    def _bad_request(exc: BadRequest) -> Response:
        return _for_path(400, str(exc), cloudstack_code=PARAM_ERROR)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        response = _for_path(exc.code or 500, exc.description or exc.name)
        for name, value in exc.get_headers():  # Allow on a 405, WWW-Authenticate, ...
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("%s %s: unexpected error", request.method, request.path)
        return _for_path(500, f"internal error ({type(exc).__name__})", cloudstack_code=INTERNAL_ERROR)
