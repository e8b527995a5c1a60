"""CloudStack's API on /client/api: listUsageRecords as CloudStack's usage server answers it."""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from kvmeter.collector import report
from kvmeter.collector.api_errors import BadRequest, cloudstack_error
from kvmeter.collector.api_usage import parse_type, query
from kvmeter.collector.store import Store


def register(app: Flask, store: Store) -> None:
    @app.get("/client/api")
    def cloudstack_api() -> Response:
        args = {k.lower(): v for k, v in request.args.items()}
        command = args.get("command", "")
        if command != "listUsageRecords":
            return cloudstack_error(command or "api", 432, f"command {command!r} is not supported")
        try:
            start = report.parse_when(args["startdate"])
            end = report.parse_when(args["enddate"], end_of_day=True)
            if len(args["enddate"].strip()) > 10:
                end += 1000  # yyyy-MM-dd HH:mm:ss names the last second included
            usage_type = parse_type(args.get("type"))
        except KeyError as exc:
            return cloudstack_error("listusagerecords", 431, f"missing parameter {exc.args[0]}")
        except (ValueError, BadRequest) as exc:
            return cloudstack_error("listusagerecords", 431, str(exc))
        resource = args.get("usageid")
        if resource and usage_type is None:
            return cloudstack_error("listusagerecords", 431, "usageid needs type")
        try:
            page = int(args.get("page", "1"))
            pagesize = int(args.get("pagesize", "0"))
        except ValueError:
            return cloudstack_error("listusagerecords", 431, "page and pagesize must be integers")
        if page < 1 or pagesize < 0:
            return cloudstack_error("listusagerecords", 431, "page must be >= 1 and pagesize >= 0")
        rows = query(store, start, end, args.get("accountid"), usage_type, resource)
        response = report.cloudstack_response(rows)
        if pagesize:  # CloudStack's paging: count stays the total, usagerecord is one page
            body = response["listusagerecordsresponse"]
            body["usagerecord"] = body["usagerecord"][(page - 1) * pagesize : page * pagesize]
        return jsonify(response)
