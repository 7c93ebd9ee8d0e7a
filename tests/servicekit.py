"""Helpers of the service tests: the app in-process (its lifespan and an httpx ASGI client on a loop of its own
thread, driven synchronously), toy images, and a real uvicorn process of `audit serve`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


class InProcess:
    """``create_app(config, models)`` with its lifespan entered; ``call(method, path, **kw)`` -> httpx.Response,
    ``gather(*requests)`` runs several concurrently."""

    def __init__(self, app):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stack = contextlib.AsyncExitStack()
        self.run(self._enter())

    async def _enter(self):
        await self._stack.enter_async_context(self.app.router.lifespan_context(self.app))
        self.client = await self._stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test", timeout=300))

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        return self.run(self.client.request(method, path, **kw))

    def gather(self, *requests: tuple) -> list[httpx.Response]:
        async def all_of():
            return await asyncio.gather(*(self.client.request(m, p, **kw) for m, p, kw in requests))

        return self.run(all_of())

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.call("GET", "/v2/health/ready").status_code == 200:
                return
            time.sleep(0.1)
        raise TimeoutError("service not ready")

    def close(self) -> None:
        self.run(self._stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``audit serve ARGS`` as a real uvicorn process on a free loopback port."""

    def __init__(self, args: list[str], env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"} | (env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "audit.cli", "serve", "--port", str(self.port), *args],
                                     env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"audit serve exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError("audit serve not ready")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
