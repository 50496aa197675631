"""A fault-injecting HTTP proxy for an S3 server on loopback: fails a share of requests the way S3 does.

Faults: ``slowdown`` answers 503 SlowDown (S3's throttling reply), ``internal`` 500 InternalError, ``drop``
closes the connection without an answer (a reset), ``slow`` forwards the request but answers ``slow_s`` seconds
late, ``deny`` answers every request 403 AccessDenied. Everything else is forwarded byte for byte
(chunked uploads included) to the upstream server. It is a real server on 127.0.0.1, so Ray workers in other
processes go through it too.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length"}
ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>kalm-proxy</RequestId></Error>"
)


class FaultProxy:
    def __init__(self, upstream: str, *, slowdown: float = 0.0, drop: float = 0.0, internal: float = 0.0,
                 slow: float = 0.0, slow_s: float = 1.0, deny: bool = False, seed=0):  # fmt: skip
        self.upstream = upstream.removeprefix("http://")
        self.shares = [("slowdown", slowdown), ("internal", internal), ("drop", drop), ("slow", slow)]
        self.slow_s, self.deny = slow_s, deny
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "slowdown": 0, "internal": 0, "drop": 0, "slow": 0, "deny": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    raw = b""
                    while True:  # keep the chunk framing (and any aws-chunked signatures) as sent
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        if size == 0:
                            while True:
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, message: str):
                payload = ERROR_XML.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _handle(self):
                body = self._body()
                fault = proxy._pick()
                if fault == "drop":
                    self.close_connection = True
                    return  # no reply: the client sees the connection closed
                if fault == "slowdown":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "internal":
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                if fault == "deny":
                    return self._error(403, "AccessDenied", "Access Denied")
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _pick(self) -> str:
        with self.lock:
            fault, r, edge = "forwarded", self.rng.random(), 0.0
            if self.deny:
                fault = "deny"
            else:
                for name, share in self.shares:
                    edge += share
                    if r < edge:
                        fault = name
                        break
            self.counts[fault] += 1
            return fault

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
