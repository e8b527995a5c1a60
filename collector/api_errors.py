"""Error bodies of the API: JSON for /v1 and the rest, CloudStack's shape on /client/api."""

from __future__ import annotations

from flask import Response, jsonify


class BadRequest(ValueError):
    pass


def error(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def cloudstack_error(command: str, code: int, text: str) -> Response:
    response = jsonify(
        {f"{command.lower()}response": {"errorcode": code, "cserrorcode": 9999, "errortext": text}}
    )
    response.status_code = code
    return response
