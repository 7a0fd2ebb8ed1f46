"""A reward behind HTTP: ``tempflow serve-reward --reward SPEC [--host H] [--port P] [--token T]``.

The server holds one reward (any ``make_reward`` spec) so that a trainer on another GPU, process or
machine can use it through the ``remote`` reward (``tempflow.rewards.remote``). Standard library
only (``http.server``): JSON over HTTP/1.1, images as PNG or raw uint8 bytes, never pickle.

Wire protocol
-------------
``GET /health`` (no token needed) -> 200::

    {"status": "ok", "reward": SPEC, "version": V, "encodings": ["png", "raw"],
     "limits": {"max_batch": N, "max_bytes": N, "max_pixels": N}, "served": {"requests": n, "images": n}}

``POST /score`` with ``Authorization: Bearer TOKEN`` when the server has a token; body::

    {"images": IMAGES, "prompts": [str, ...], "metadata": [{...}, ...]}      # metadata optional

IMAGES holds B images of one size, in one of two encodings::

    {"encoding": "png", "data": [base64 PNG, ...]}
    {"encoding": "raw", "dtype": "uint8", "shape": [B, H, W, 3], "data": base64 bytes}

``raw`` is the bytes of a C-ordered uint8 array of that shape: image, row, column, then the R, G, B
channel (channel-last, as numpy and PIL hold images). PNGs may be RGB, RGBA (alpha dropped), grey or
palette; they are converted to RGB. The reward sees ``(B, 3, H, W) float32`` equal to ``value / 255``.

Answer 200: ``{"scores": [float | null, ...], "metadata": [{...}, ...]}``, one score per image in
order. JSON has no NaN: a NaN or infinite score is sent as ``null`` (the client turns it back into
NaN). ``metadata`` is the request's metadata after the reward wrote into it (``shapes`` adds
``category`` and ``strict``, every reward ``rewards.NAME``); values that are not JSON are left out.

Errors answer ``{"error": reason}`` with status 400 (not JSON, missing or unknown fields, bad image
data, lengths that differ, an input the reward refuses with a TempflowError, such as a prompt
outside its grammar), 401 (missing or wrong token), 404 / 405 (other paths / methods), 411 (no
Content-Length), 413 (body over ``max_bytes``, read from Content-Length before the body; more than
``max_batch`` images; more than ``max_pixels`` pixels in all) or 500 (the reward raised, its
traceback goes to the server's stderr, or returned the wrong number of scores).

Requests are read and decoded in parallel threads; scoring is serialised by one lock (one model).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hmac
import io
import ipaddress
import json
import math
import os
import signal
import socket
import socketserver
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

from tempflow import __version__
from tempflow.errors import TempflowError

TOKEN_ENV = "TEMPFLOW_REWARD_TOKEN"  # read by the server (when --token is not given) and by the client
MAX_BATCH = 256  # images per request
MAX_BYTES = 128 * 2**20  # request body, bytes
MAX_PIXELS = 2**26  # pixels per request, all images together (64 images of 1024x1024)
READ_TIMEOUT = 60.0  # seconds a connection may stay silent before the server drops it
DRAIN_TIMEOUT = 2.0  # seconds spent discarding an unread body after an early error
_SKIP = object()  # a value jsonable() leaves out

RewardCallable = Callable[[torch.Tensor, list[str], list[dict]], torch.Tensor]


class RequestError(Exception):
    """A request that gets an error answer: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


# ---- JSON and image decoding -----------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` as JSON data: non-finite floats become None, numpy / torch scalars numbers.

    Dict entries that are not JSON (large arrays, objects) are left out; list items become None.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {str(k): jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if isinstance(value, (list, tuple)):
        return [None if v is _SKIP else v for v in map(jsonable, value)]
    if isinstance(value, (np.ndarray, np.generic)) and np.size(value) <= 4096:
        return jsonable(value.tolist())
    if isinstance(value, torch.Tensor) and value.numel() <= 4096:
        return jsonable(value.tolist())
    return _SKIP


def _fields(obj: dict, required: set[str], optional: set[str], where: str) -> None:
    unknown = sorted(set(obj) - required - optional)
    if unknown:
        expected = ", ".join(sorted(required | optional))
        raise RequestError(400, f"unknown field {unknown[0]!r} in {where}; expected {expected}")
    missing = sorted(required - set(obj))
    if missing:
        raise RequestError(400, f"missing field {missing[0]!r} in {where}")


def _b64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        raise RequestError(400, f"{what} is not a base64 string") from None


def _decode_png(obj: dict, count: int, max_pixels: int) -> np.ndarray:
    from PIL import Image

    _fields(obj, {"encoding", "data"}, set(), "images")
    data = obj["data"]
    if not isinstance(data, list) or len(data) != count:
        got = f"{len(data)} images" if isinstance(data, list) else type(data).__name__
        raise RequestError(400, f"images.data must be a list of {count} base64 PNGs (one per prompt), got {got}")
    arrays, budget = [], max_pixels
    for i, text in enumerate(data):
        raw = _b64(text, f"image {i}")
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.format != "PNG":
                    raise RequestError(400, f"image {i} is {im.format}, not PNG")
                budget -= im.width * im.height
                if budget < 0:
                    raise RequestError(413, f"the images have more than {max_pixels} pixels in all (--max-pixels)")
                arrays.append(np.asarray(im.convert("RGB")))
        except RequestError:
            raise
        except Exception as e:  # PIL raises many types for corrupt files; all are the client's fault
            raise RequestError(400, f"image {i} is not a readable PNG ({type(e).__name__}: {e})") from None
        if arrays[i].shape != arrays[0].shape:
            raise RequestError(400, f"image {i} is {arrays[i].shape[1]}x{arrays[i].shape[0]} but image 0 is "
                                    f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; send images of one size")
    return np.stack(arrays)  # (B, H, W, 3)


def _decode_raw(obj: dict, count: int, max_pixels: int) -> np.ndarray:
    _fields(obj, {"encoding", "dtype", "shape", "data"}, set(), "images")
    if obj["dtype"] != "uint8":
        raise RequestError(400, f"images.dtype must be 'uint8', got {obj['dtype']!r}")
    shape = obj["shape"]
    if (not isinstance(shape, list) or len(shape) != 4 or shape[3] != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise RequestError(400, f"images.shape must be [B, H, W, 3] with positive integers, got {shape!r}")
    if shape[0] != count:
        raise RequestError(400, f"{shape[0]} images but {count} prompts")
    if shape[0] * shape[1] * shape[2] > max_pixels:
        raise RequestError(413, f"the images have more than {max_pixels} pixels in all (--max-pixels)")
    raw = _b64(obj["data"], "images.data")
    if len(raw) != math.prod(shape):
        raise RequestError(400, f"images.data holds {len(raw)} bytes but shape {shape} needs {math.prod(shape)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()  # (B, H, W, 3)


def decode_images(obj: Any, count: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The ``images`` field of a request -> (B, 3, H, W) float32 in [0, 1]; RequestError if it is not valid."""
    if not isinstance(obj, dict):
        raise RequestError(400, 'images must be an object {"encoding": "png" or "raw", "data": ...}')
    decoders = {"png": _decode_png, "raw": _decode_raw}
    if obj.get("encoding") not in decoders:
        raise RequestError(400, f"unknown images.encoding {obj.get('encoding')!r}; use 'png' or 'raw'")
    pixels = decoders[obj["encoding"]](obj, count, max_pixels)  # (B, H, W, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)  # (B, 3, H, W)


def parse_request(body: bytes, max_batch: int = MAX_BATCH,
                  max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A ``POST /score`` body -> (images (B, 3, H, W), prompts, metadata); RequestError if it is not valid."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise RequestError(400, "the body must be a JSON object {images, prompts, metadata}")
    _fields(req, {"images", "prompts"}, {"metadata"}, "the request")
    prompts = req["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "prompts must be a list of strings")
    if not prompts:
        raise RequestError(400, "no prompts: send at least one image and its prompt")
    if len(prompts) > max_batch:
        raise RequestError(413, f"{len(prompts)} images is over this server's limit of {max_batch} (--max-batch)")
    metadata = req.get("metadata")
    if metadata is None:
        metadata = [{} for _ in prompts]
    if (not isinstance(metadata, list) or len(metadata) != len(prompts)
            or not all(isinstance(m, dict) for m in metadata)):
        raise RequestError(400, f"metadata must be a list of {len(prompts)} objects, one per prompt")
    return decode_images(req["images"], len(prompts), max_pixels), prompts, metadata


# ---- the server ----------------------------------------------------------------------------------------


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server holding one reward; build it with ``make_server``."""

    daemon_threads = True  # idle keep-alive connections do not hold the process at exit

    def __init__(self, address: tuple[str, int], token: str | None, limits: dict[str, int], log: bool) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.token, self.limits, self.log = token, limits, log
        self.reward: RewardCallable | None = None
        self.name = ""
        self.score_lock = threading.Lock()  # one model: one batch at a time
        self._busy = threading.Condition()
        self._active = 0
        self.served = {"requests": 0, "images": 0}
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host (slow where there is no DNS)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def url(self) -> str:
        host = self.server_name
        return f"http://[{host}]:{self.server_port}" if ":" in host else f"http://{host}:{self.server_port}"

    def health(self) -> dict[str, Any]:
        with self._busy:
            served = dict(self.served)
        return {"status": "ok", "reward": self.name, "version": __version__, "encodings": ["png", "raw"],
                "limits": dict(self.limits), "served": served}

    @contextlib.contextmanager
    def activity(self) -> Iterator[None]:
        """Count a request in flight, so that ``wait_idle`` can let it finish at shutdown."""
        with self._busy:
            self._active += 1
        try:
            yield
        finally:
            with self._busy:
                self._active -= 1
                self._busy.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._busy:
            return self._busy.wait_for(lambda: self._active == 0, timeout)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> list[float | None]:
        """Run the reward under the lock; scores as JSON numbers (None where not finite)."""
        assert self.reward is not None
        with self.score_lock:
            try:
                with torch.no_grad():
                    out = self.reward(images, prompts, metadata)
                scores = torch.as_tensor(out).detach().float().cpu().reshape(-1)  # (B,)
            except TempflowError as e:
                raise RequestError(400, f"the reward refused the request: {e}") from None
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                raise RequestError(500, f"the reward failed: {type(e).__name__}: {e}") from None
        if scores.numel() != len(prompts):
            raise RequestError(500, f"the reward returned {scores.numel()} scores for {len(prompts)} images")
        with self._busy:
            self.served["requests"] += 1
            self.served["images"] += len(prompts)
        return [v if math.isfinite(v) else None for v in scores.tolist()]


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"
    server_version = f"tempflow-reward/{__version__}"
    timeout = READ_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log:
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # the client went away (it timed out, or was stopped)
            self.close_connection = True

    def _refuse(self, error: RequestError, unread: int) -> None:
        """Answer an error before the body was read, then discard (a bounded part of) the body and close.

        Reading what the client is still sending lets it receive the answer instead of a reset connection.
        """
        self.close_connection = True
        extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        self._send(error.status, {"error": error.reason}, extra)
        left = min(unread, self.server.limits["max_bytes"])
        with contextlib.suppress(OSError):
            self.connection.settimeout(DRAIN_TIMEOUT)
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        path = self._path()
        if path == "/health":
            self._send(200, self.server.health())
        elif path == "/score":
            self._send(405, {"error": "use POST /score"}, {"Allow": "POST"})
        else:
            self._send(404, {"error": f"no such path {path!r}; use POST /score or GET /health"})

    def do_POST(self) -> None:  # noqa: N802
        with self.server.activity():
            try:
                length = self._check_request()
            except RequestError as e:
                return self._refuse(e, max(0, _int(self.headers.get("Content-Length")) or 0))
            body = self.rfile.read(length)
            if len(body) < length:  # the client went away mid-body
                self.close_connection = True
                return
            try:
                images, prompts, metadata = parse_request(body, self.server.limits["max_batch"],
                                                          self.server.limits["max_pixels"])
                scores = self.server.score(images, prompts, metadata)
            except RequestError as e:
                return self._send(e.status, {"error": e.reason})
            self._send(200, {"scores": scores, "metadata": jsonable(metadata)})

    def _check_request(self) -> int:
        """Path, token and size, all before the body is read; returns the body length."""
        if self._path() != "/score":
            raise RequestError(404, f"no such path {self._path()!r}; use POST /score or GET /health")
        if self.server.token is not None:
            scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                raise RequestError(401, "missing token: send the header 'Authorization: Bearer TOKEN'")
            if not hmac.compare_digest(given.strip().encode(), self.server.token.encode()):
                raise RequestError(401, "wrong token")
        length = _int(self.headers.get("Content-Length"))
        if length is None:
            raise RequestError(411, "send a Content-Length header (chunked bodies are not accepted)")
        if length < 0:
            raise RequestError(400, "Content-Length must be >= 0")
        if length > self.server.limits["max_bytes"]:
            raise RequestError(413, f"the body has {length} bytes, over this server's limit of "
                                    f"{self.server.limits['max_bytes']} (--max-bytes)")
        return length


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def make_server(reward: str | RewardCallable = "shapes", host: str = "127.0.0.1", port: int = 8000,
                token: str | None = None, max_batch: int = MAX_BATCH, max_bytes: int = MAX_BYTES,
                max_pixels: int = MAX_PIXELS, log: bool = False, reward_options: dict[str, Any] | None = None,
                name: str | None = None) -> RewardServer:
    """Bind a reward server (``port=0`` picks a free port; see ``server.url``) and build its reward.

    ``reward`` is a ``make_reward`` spec (``"shapes"``, ``"pickscore:1,aesthetic:0.5"``; with
    ``reward_options`` as its keyword arguments) or a reward function. Call ``serve_forever()`` (in a
    thread in tests) or ``serve()``; ``shutdown()`` and ``server_close()`` stop it.
    """
    for what, value in (("--max-batch", max_batch), ("--max-bytes", max_bytes), ("--max-pixels", max_pixels)):
        if value < 1:
            raise TempflowError(f"{what} must be >= 1, got {value}")
    if not 0 <= port <= 65535:
        raise TempflowError(f"--port must be in 0..65535 (0 picks a free one), got {port}")
    if token is not None and not token.strip():
        raise TempflowError("the token is empty; give a non-empty --token or leave it out")
    limits = {"max_batch": max_batch, "max_bytes": max_bytes, "max_pixels": max_pixels}
    try:
        server = RewardServer((host, port), token.strip() if token else None, limits, log)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise TempflowError(f"port {port} on {host} is in use; pick another --port or stop the server "
                                "that holds it") from None
        raise TempflowError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    try:
        if isinstance(reward, str):
            from tempflow.rewards import make_reward

            server.reward, server.name = make_reward(reward, **(reward_options or {})), name or reward
        else:
            server.reward, server.name = reward, name or getattr(reward, "__name__", type(reward).__name__)
    except BaseException:
        server.server_close()
        raise
    return server


def serve(server: RewardServer, grace: float = 30.0) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting, let requests in flight finish (up to ``grace`` s), close."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        while not stop.wait(1.0) and thread.is_alive():
            pass
    finally:
        server.shutdown()
        server.wait_idle(grace)
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(reward: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
               max_batch: int = MAX_BATCH, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               quiet: bool = False) -> int:
    """``tempflow serve-reward``: build, announce, serve until a signal; returns the exit code."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    server = make_server(reward, host, port, token, max_batch, max_bytes, max_pixels, log=not quiet)
    if not _is_loopback(host) and token is None:
        print(f"tempflow: warning: listening on {host} without a token; anyone who can reach this port can use "
              f"the reward (set --token or {TOKEN_ENV})", file=sys.stderr)
    print(f"serving reward {server.name!r} at {server.url} (POST /score, GET /health; token "
          f"{'required' if token else 'not required'}); Ctrl-C stops", flush=True)
    serve(server)
    print("reward server stopped", flush=True)
    return 0
