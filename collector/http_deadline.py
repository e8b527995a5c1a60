"""One POST of an outbound delivery (the hand-off's webhook, the balance alerts' webhook), over
within its timeout as a whole.

    status = post_status(request, timeout_s)    # the answer's status, 3xx not followed
    refuses_item(status) -> bool                # a 4xx about the one item POSTed (Rejected)

urllib's timeout bounds each socket operation, not the request: a receiver that trickles its
answer (a byte every few seconds) would hold a delivery round, and the hand-off's lease with
it, for ever. urllib has no total deadline, so the request's sockets are shut down when
timeout_s has passed: the request fails (TimeoutError, an OSError) and the delivery is tried
again later under the same idempotency key, as for a receiver that is down.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any


class Rejected(Exception):
    """The receiver refused this one item (a 4xx that is about the item, not about the receiver
    or the sender's credentials): trying it again at once is pointless, the items after it go on."""


# 4xx answers about the receiver, the URL or the sender's credentials, not about the one item:
# a delivery stops there (or retries) as it does for a receiver that is down.
_NOT_ITEM_SPECIFIC = {401, 403, 404, 405, 407, 408, 410, 425, 429}


def refuses_item(status: int) -> bool:
    """Whether an answer with this status refuses the one item POSTed (see Rejected)."""
    return 400 <= status < 500 and status not in _NOT_ITEM_SPECIFIC


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer, not an acknowledgement: never followed (urllib would follow a 301/302/
    303 to a POST with a GET, without the body, and take that GET's 2xx for the receiver's)."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


class _Deadline:
    """The connections of one request, shut down once its deadline has passed."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.ends = time.monotonic() + timeout_s
        self.passed = False
        self._lock = threading.Lock()
        self._conns: list[http.client.HTTPConnection] = []

    def connection(self, cls: type[http.client.HTTPConnection]) -> Any:
        def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
            # connect() gets what is left of the deadline, not the whole timeout again
            kwargs["timeout"] = max(0.001, min(kwargs.get("timeout", self.timeout_s), self.left()))
            conn = cls(*args, **kwargs)
            with self._lock:
                self._conns.append(conn)
            return conn

        return make

    def left(self) -> float:
        return self.ends - time.monotonic()

    def expire(self) -> None:
        with self._lock:
            self.passed = True
            for conn in self._conns:
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)  # a blocked read or write returns now
                    except OSError:
                        pass


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: Any) -> Any:
        return self.do_open(self.deadline.connection(http.client.HTTPConnection), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()  # the default context: certificates verified
        self.deadline = deadline

    def https_open(self, req: Any) -> Any:
        return self.do_open(self.deadline.connection(http.client.HTTPSConnection), req)


def post_status(request: urllib.request.Request, timeout_s: float) -> int:
    """The status of the answer to `request` (any: a 4xx/5xx is returned too, a 3xx not
    followed), within `timeout_s` in all. Raises OSError (TimeoutError past the deadline,
    refused, reset), http.client.HTTPException or ValueError (an answer that is not HTTP)."""
    deadline = _Deadline(timeout_s)
    opener = urllib.request.build_opener(NoRedirect, _HTTP(deadline), _HTTPS(deadline))
    timer = threading.Timer(timeout_s, deadline.expire)
    timer.daemon = True
    timer.start()
    try:
        try:
            with opener.open(request, timeout=timeout_s) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()  # its connection, not left to the garbage collector
            status = int(exc.code)
    except (OSError, ValueError, http.client.HTTPException):
        if deadline.passed:
            raise TimeoutError(f"no whole answer within {timeout_s:g} s") from None
        raise
    finally:
        timer.cancel()
    if deadline.passed:  # cut short: http.client takes an end of file for the end of the headers
        raise TimeoutError(f"no whole answer within {timeout_s:g} s")
    return status
