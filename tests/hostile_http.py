"""A hostile ``/sdapi/v1/txt2img`` service for the HTTP client's tests: loopback only, standard library only,
bounded (every connection has a socket timeout and every misbehaviour ends within seconds or when the server
stops).

``HostileService().start()`` answers the probes (``options``: ``{}``, ``sd-models``: ``[]``) and txt2img with a
valid 16x16 PNG and the seed it was sent, unless ``plays[path]`` names a misbehaviour: a function
``(sock, request) -> None`` writing whatever raw bytes it likes. The helpers below build the usual ones.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import socketserver
import threading
import time
from typing import Any, Callable

import numpy as np
from PIL import Image

Play = Callable[[socket.socket, Any], None]
MAX_REQUEST = 1 << 20


def png_b64(size: int = 16, value: int = 128) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def answer(body: Any, status: int = 200, content_type: str = "application/json", raw: bool = False) -> Play:
    """A well-formed HTTP answer of ``body`` (JSON-encoded unless ``raw``)."""
    data = body if raw else json.dumps(body).encode()

    def play(sock: socket.socket, request: Any) -> None:
        sock.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)
    return play


def txt2img(images: Any = None, info: Any = "auto", **extra: Any) -> Play:
    """A txt2img answer; ``info="auto"`` reports the seed that was sent."""
    def play(sock: socket.socket, request: Any) -> None:
        seed = request.get("seed") if isinstance(request, dict) else None
        body = {"images": [png_b64()] if images is None else images, **extra}
        body["info"] = json.dumps({"seed": seed}) if info == "auto" else info
        answer(body)(sock, request)
    return play


def trickle(data: bytes, every: float, stop: threading.Event, limit: float = 20.0) -> Play:
    """``data`` one byte every ``every`` seconds (repeated until ``stop`` or ``limit`` seconds)."""
    def play(sock: socket.socket, request: Any) -> None:
        end = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < end:
            for b in data:
                if stop.wait(every):
                    return
                sock.sendall(bytes([b]))
    return play


def raw(data: bytes) -> Play:
    """These bytes as the whole answer, then the connection closes (a truncated or malformed answer)."""
    def play(sock: socket.socket, request: Any) -> None:
        sock.sendall(data)
    return play


def endless(head: bytes, stop: threading.Event, limit_bytes: int) -> Play:
    """``head``, then zeros until the client hangs up, the server stops or ``limit_bytes`` are sent."""
    def play(sock: socket.socket, request: Any) -> None:
        sock.sendall(head)
        sent, block = 0, b"0" * (1 << 16)
        while not stop.is_set() and sent < limit_bytes:
            try:
                sock.sendall(block)
            except OSError:
                return
            sent += len(block)
    return play


class HostileService:
    def __init__(self) -> None:
        self.plays: dict[str, Play] = {}
        self.stop_event = threading.Event()
        self.requests: list[str] = []
        service = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(10)
                try:
                    path, body = _read_request(sock)
                    service.requests.append(path)
                    play = service.plays.get(path) or _default(path)
                    play(sock, body)
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HostileService":
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()


def _default(path: str) -> Play:
    if path.endswith("/options"):
        return answer({})
    if path.endswith("/sd-models"):
        return answer([])
    if path.endswith("/txt2img"):
        return txt2img()
    return answer({"error": "not found"}, 404)


def _read_request(sock: socket.socket) -> tuple[str, Any]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk or len(data) > MAX_REQUEST:
            raise OSError("no request")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = min(int(value), MAX_REQUEST)
    while len(body) < length:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        body += chunk
    try:
        return path, json.loads(body) if body else None
    except ValueError:
        return path, None
