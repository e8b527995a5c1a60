"""Dead letters on the API, for operators only: what the collector could not use, and re-driving it.

    GET  /v1/dead-letters?state=open|resolved|all&source=&after=&limit=   oldest first, no bytes
    GET  /v1/dead-letters/<id>                                            one, with its bytes
    POST /v1/dead-letters/<id>/retry                                      through the live path

A caller scoped to accounts or domains gets 403 on all three: a letter's bytes may be anyone's.
A retry runs under the collector's own settings (redrive.Redriver); the result is in the body
(`resolved`, `failed` with the new reason, or `already_resolved`).
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from kvmeter.collector import api_params
from kvmeter.collector.api_auth import current_principal
from kvmeter.collector.api_errors import error
from kvmeter.collector.api_params import BadRequest
from kvmeter.collector.redrive import Redriver, letter_dict, retried_dict
from kvmeter.collector.store import LETTER_STATES, Store

MAX_PAGE = 1000
MAX_ID = 2**62  # a bigger id is no letter (404), never a value the database refuses
SOURCES = ("lifecycle", "measures")


def register(app: Flask, store: Store, redriver: Redriver | None) -> None:
    @app.before_request
    def _operators_only() -> Response | None:
        if request.path.startswith("/v1/dead-letters") and not current_principal().operator:
            return error(403, "dead letters are for operator credentials only")
        return None

    @app.get("/v1/dead-letters")
    def list_letters() -> Response:
        args = request.args
        state = args.get("state", "open")
        if state not in LETTER_STATES:
            raise BadRequest(f"state must be one of {', '.join(LETTER_STATES)}")
        source = args.get("source")  # given, it names one: "" is refused, not taken for all
        if source is not None and source not in SOURCES:
            raise BadRequest(f"source must be one of {', '.join(SOURCES)}")
        after, limit = args.get("after", "0"), args.get("limit", "100")
        after_id = api_params.integer(after, "after", maximum=MAX_ID)
        count = api_params.integer(limit, "limit", minimum=1, maximum=MAX_PAGE)
        letters = store.dead_letters(state=state, source=source, after_id=after_id, limit=count)
        body = {"count": len(letters), "dead_letters": [letter_dict(x) for x in letters]}
        if len(letters) == count:
            body["next_after"] = letters[-1].id
        return jsonify(body)

    @app.get(f"/v1/dead-letters/<int(max={MAX_ID}):letter_id>")
    def show(letter_id: int) -> Response:
        letter = store.dead_letter_by_id(letter_id)
        if letter is None:
            return error(404, f"no dead letter {letter_id}")
        return jsonify(letter_dict(letter, with_raw=True))

    @app.post(f"/v1/dead-letters/<int(max={MAX_ID}):letter_id>/retry")
    def retry(letter_id: int) -> Response:
        if redriver is None:
            # a configuration of this server, not a fault: retries need the collector's settings
            return error(
                409, "this API runs without the collector's settings: use `kvmeter dead-letters retry`"
            )
        done = redriver.retry(letter_id)
        if done is None:
            return error(404, f"no dead letter {letter_id}")
        return jsonify(retried_dict(done))
