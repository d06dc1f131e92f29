"""A loopback HTTP proxy in front of the S3 endpoint that injects the faults object storage has.

Clients (s3fs, boto3, pyarrow's S3 filesystem, Ray workers) talk to the proxy as their endpoint;
the proxy forwards each request to the real endpoint (moto) and passes its answer back, except for
the requests a :class:`Fault` chooses, by method and a regular expression on the path:

* ``reset``: the answer's headers and half of its body are sent, then the connection is reset (a
  TCP RST), as when a load balancer or a NAT drops a long download;
* ``reset_request``: the connection is reset before the request reaches the endpoint (the request
  had no effect);
* ``stall``: nothing is sent for ``stall_s`` seconds, then the connection is closed.

Each fault fires ``times`` times (``None``: always) and counts its hits, so a test can say "one GET
of 00002.tar is reset once" and then check that it happened; ``after`` lets that many matching
requests through untouched first ("every upload after the first succeeds fails").
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Fault:
    method: str  # "GET", "PUT", "POST", "HEAD", "DELETE", or "*"
    path: str  # regular expression searched in the request target (path and query)
    action: str = "reset"  # "reset" | "reset_request" | "stall"
    times: int | None = 1  # None: every matching request
    stall_s: float = 30.0
    after: int = 0  # matching requests let through before the fault starts firing
    hits: int = 0
    passed: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return self.method in ("*", method) and re.search(self.path, target) is not None


@dataclass
class FaultProxy:
    upstream_port: int
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    # -- configuration -------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _choose(self, method: str, target: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, target))
            for fault in self.faults:
                if fault.matches(method, target):
                    if fault.passed < fault.after:
                        fault.passed += 1
                        return None
                    fault.hits += 1
                    return fault
        return None

    # -- serving -------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        reader = _Reader(client)
        try:
            while True:
                head = reader.head()
                if head is None:
                    return
                method, target = head.split(b" ", 2)[:2]
                if b"\r\nexpect: 100-continue" in head.lower():  # botocore, for large PUTs
                    head = re.sub(rb"(?i)\r\nexpect: 100-continue", b"", head)
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = reader.body(head, request=True, method=method.decode())
                fault = self._choose(method.decode(), target.decode("latin-1"))
                if fault is not None and fault.action == "reset_request":
                    _reset(client)
                    return
                if upstream is None:
                    upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    upstream_reader = _Reader(upstream)
                upstream.sendall(head + body)
                answer = upstream_reader.head()
                if answer is None:
                    return
                answer_body = upstream_reader.body(answer, request=False, method=method.decode())
                if fault is not None and fault.action == "stall":
                    time.sleep(fault.stall_s)
                    return
                if fault is not None and fault.action == "reset":
                    client.sendall(answer + answer_body[: len(answer_body) // 2])
                    _reset(client)
                    return
                client.sendall(answer + answer_body)
                if b"connection: close" in answer.lower():
                    return
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Reader:
    """Reads HTTP/1.1 messages (head, then a body by Content-Length or chunked) from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()  # appends are amortised O(1): a 50 MiB part is 800 reads

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buffer += data
        return True

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise OSError("connection closed mid-message")
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise OSError("connection closed mid-message")
        return self._take(self.buffer.index(b"\r\n") + 2)

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                return None
        return self._take(self.buffer.index(b"\r\n\r\n") + 4)

    def body(self, head: bytes, *, request: bool, method: str) -> bytes:
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if not request:
            status = int(head.split(b" ", 2)[1])
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                return b""
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            parts = []
            while True:
                size_line = self._line()
                parts.append(size_line)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:  # the last chunk: trailers (maybe none), then an empty line
                    while (line := self._line()) != b"\r\n":
                        parts.append(line)
                    return b"".join([*parts, line])
                parts.append(self._take(size + 2))
        if b"content-length" in headers:
            return self._take(int(headers[b"content-length"]))
        if request:
            return b""
        while self._fill():  # an answer without a length runs to the end of the connection
            pass
        return self._take(len(self.buffer))
