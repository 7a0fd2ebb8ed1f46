"""A reward behind HTTP: ``tempflow serve-reward --reward SPEC [--host H] [--port P]``.

The server holds one reward (any ``make_reward`` spec) so that a trainer on another GPU, process or
machine can use it through the ``remote`` reward (``tempflow.rewards.remote``). Standard library
only (``http.server``): JSON over HTTP/1.1, images as PNG or raw uint8 bytes, never pickle.

Wire protocol
-------------
``GET /health`` (no token needed) -> 200::

    {"status": "ok", "reward": SPEC, "version": V, "encodings": ["png", "raw"],
     "limits": {"max_batch": N, "max_bytes": N, "max_pixels": N, "max_image_pixels": N, "workers": N,
                "max_decodes": N, "image_size": N | null},
     "served": {"requests": n, "images": n}}

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
``max_batch`` images; an image over ``max_image_pixels`` or more than ``max_pixels`` pixels in all,
read from each PNG's IHDR header or the raw shape before anything is decoded) or 500 (the reward
raised, its traceback goes to the server's stderr, or returned the wrong number of scores).

Resources
---------
Every limit is a bound on memory or time, and each has a flag:

- ``workers`` (8) connections are served at once, each by its own thread; further connections wait
  in the listen queue (up to 128, then the client's connection fails and it retries) until a worker
  is free. A worker waits at most 5 s for the next request on a kept-alive connection.
- ``max_decodes`` (2) requests are decoded or scored at once; a request holds its decoded images
  until it is scored, so at most this many decoded batches are in memory. Bodies are read before
  (at most ``workers`` of them, each at most ``max_bytes``).
- ``max_pixels``: pixels per request, all images together. By default ``max_batch`` images of the
  size the reward declares (its ``image_size``: 64x64 for the shapes rewards, so 2^20 pixels), or
  2^26 (64 images of 1024x1024) for a reward that declares none.
- ``max_image_pixels``: pixels per image, 2048x2048 = 2^22 by default (at most ``max_pixels``).
- ``max_bytes``: the request body, 128 MiB at most; by default no more than a raw request of
  ``max_pixels`` pixels needs (4 bytes a pixel in base64) plus 4 KiB an image and 1 MiB.

A decoded request takes 12 bytes a pixel (float32, each image converted as it is decoded) besides
its body and whatever the reward allocates; docs/rewards.md gives measured peaks.
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
import struct
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
MAX_BYTES = 128 * 2**20  # request body, bytes: the most any default allows
MAX_PIXELS = 2**26  # pixels per request, all images together, for a reward without an image_size (64 x 1024^2)
MAX_IMAGE_PIXELS = 2**22  # pixels per image (2048x2048)
WORKERS = 8  # connections served at once
MAX_DECODES = 2  # requests decoded or scored at once
LISTEN_QUEUE = 128  # connections waiting for a worker before new ones are refused by the system
READ_TIMEOUT = 60.0  # seconds a connection may stay silent before the server drops it
KEEPALIVE_IDLE = 5.0  # seconds a worker waits for the next request on a kept-alive connection
DRAIN_TIMEOUT = 2.0  # seconds spent discarding an unread body after an early error
JSON_VALUES = 1024  # JSON values (commas and colons) a request may hold per image, metadata included
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


def png_size(text: Any, what: str) -> tuple[int, int]:
    """(width, height) declared by the IHDR header of a base64 PNG, read from its first 33 bytes (44
    base64 characters) without decoding the image; RequestError if it does not start like a PNG."""
    if not isinstance(text, str):
        raise RequestError(400, f"{what} is not a base64 string")
    head = _b64(text[:44], what)
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise RequestError(400, f"{what} is not a readable PNG (it does not start with the PNG signature and "
                                "an IHDR header)")
    width, height = struct.unpack(">II", head[16:24])
    if not width or not height:
        raise RequestError(400, f"{what} is not a readable PNG (its header declares {width}x{height} pixels)")
    return width, height


def check_pixels(count: int, height: int, width: int, max_pixels: int, max_image_pixels: int) -> None:
    """413 when one image of height x width or ``count`` of them are over the limits."""
    if height * width > max_image_pixels:
        raise RequestError(413, f"the images are {width}x{height} = {width * height} pixels, over this server's "
                                f"limit of {max_image_pixels} pixels per image (--max-image-pixels)")
    if count * height * width > max_pixels:
        raise RequestError(413, f"{count} images of {width}x{height} have {count * height * width} pixels in all, "
                                f"over this server's limit of {max_pixels} (--max-pixels)")


def _decode_png(obj: dict, count: int, max_pixels: int, max_image_pixels: int) -> np.ndarray:
    """(B, 3, H, W) float32 pixel values 0..255, each image converted as soon as it is decoded."""
    from PIL import Image

    _fields(obj, {"encoding", "data"}, set(), "images")
    data = obj.pop("data")
    if not isinstance(data, list) or len(data) != count:
        got = f"{len(data)} images" if isinstance(data, list) else type(data).__name__
        raise RequestError(400, f"images.data must be a list of {count} base64 PNGs (one per prompt), got {got}")
    sizes = [png_size(text, f"image {i}") for i, text in enumerate(data)]  # before any decoding
    for i, (w, h) in enumerate(sizes):
        if (w, h) != sizes[0]:
            raise RequestError(400, f"image {i} is {w}x{h} but image 0 is {sizes[0][0]}x{sizes[0][1]}; send "
                                    "images of one size")
    width, height = sizes[0]
    check_pixels(count, height, width, max_pixels, max_image_pixels)
    out = np.empty((count, 3, height, width), dtype=np.float32)
    for i in range(count):
        raw, data[i] = _b64(data[i], f"image {i}"), None  # the text is not needed any more
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.format != "PNG" or im.size != (width, height):
                    raise RequestError(400, f"image {i} is not a readable PNG (its header and its data disagree)")
                out[i] = np.asarray(im if im.mode == "RGB" else im.convert("RGB")).transpose(2, 0, 1)
        except RequestError:
            raise
        except Exception as e:  # PIL raises many types for corrupt files; all are the client's fault
            raise RequestError(400, f"image {i} is not a readable PNG ({type(e).__name__}: {e})") from None
    return out


def _decode_raw(obj: dict, count: int, max_pixels: int, max_image_pixels: int) -> np.ndarray:
    """(B, 3, H, W) float32 pixel values 0..255."""
    _fields(obj, {"encoding", "dtype", "shape", "data"}, set(), "images")
    if obj["dtype"] != "uint8":
        raise RequestError(400, f"images.dtype must be 'uint8', got {obj['dtype']!r}")
    shape = obj["shape"]
    if (not isinstance(shape, list) or len(shape) != 4 or shape[3] != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise RequestError(400, f"images.shape must be [B, H, W, 3] with positive integers, got {shape!r}")
    if shape[0] != count:
        raise RequestError(400, f"{shape[0]} images but {count} prompts")
    check_pixels(count, shape[1], shape[2], max_pixels, max_image_pixels)
    raw = _b64(obj.pop("data"), "images.data")
    if len(raw) != math.prod(shape):
        raise RequestError(400, f"images.data holds {len(raw)} bytes but shape {shape} needs {math.prod(shape)}")
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(shape)  # (B, H, W, 3), a view of the bytes
    out = np.empty((shape[0], 3, shape[1], shape[2]), dtype=np.float32)
    for i in range(shape[0]):
        out[i] = pixels[i].transpose(2, 0, 1)
    return out


def decode_images(obj: Any, count: int, max_pixels: int = MAX_PIXELS,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The ``images`` field of a request -> (B, 3, H, W) float32 in [0, 1]; RequestError if it is not valid.

    The sizes are checked against the limits before anything is decoded (PNG: each image's IHDR
    header). The image data is removed from ``obj`` as it is decoded, to free it early.
    """
    if not isinstance(obj, dict):
        raise RequestError(400, 'images must be an object {"encoding": "png" or "raw", "data": ...}')
    decoders = {"png": _decode_png, "raw": _decode_raw}
    if obj.get("encoding") not in decoders:
        raise RequestError(400, f"unknown images.encoding {obj.get('encoding')!r}; use 'png' or 'raw'")
    pixels = decoders[obj["encoding"]](obj, count, max_pixels, max_image_pixels)  # (B, 3, H, W) float32 0..255
    return torch.from_numpy(pixels).div_(255)  # (B, 3, H, W) in [0, 1]


def load_json(body: bytes, max_batch: int = MAX_BATCH) -> Any:
    """The JSON of a body, refused with 413 when it holds more than ``JSON_VALUES`` values an image
    (counted by its commas and colons before parsing: parsed JSON can take twenty times its text)."""
    values = body.count(b",") + body.count(b":")
    if values > JSON_VALUES * (max_batch + 1):
        raise RequestError(413, f"the body holds about {values} JSON values, over this server's limit of "
                                f"{JSON_VALUES} an image ({JSON_VALUES * (max_batch + 1)} with --max-batch "
                                f"{max_batch}); send less metadata")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None


def parse_request(body: bytes, max_batch: int = MAX_BATCH, max_pixels: int = MAX_PIXELS,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A ``POST /score`` body -> (images (B, 3, H, W), prompts, metadata); RequestError if it is not valid."""
    return read_request(load_json(body, max_batch), max_batch, max_pixels, max_image_pixels)


def read_request(req: Any, max_batch: int = MAX_BATCH, max_pixels: int = MAX_PIXELS,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A parsed ``POST /score`` body -> (images (B, 3, H, W), prompts, metadata); RequestError if it is not
    valid. The images are removed from ``req`` as they are decoded."""
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
    return decode_images(req.pop("images"), len(prompts), max_pixels, max_image_pixels), prompts, metadata


# ---- the server ----------------------------------------------------------------------------------------


def default_limits(image_size: int | None, max_batch: int = MAX_BATCH, max_pixels: int | None = None,
                   max_image_pixels: int | None = None, max_bytes: int | None = None) -> dict[str, int]:
    """The request limits, each given one or its default: ``max_pixels`` is ``max_batch`` images of
    ``image_size`` x ``image_size`` (the reward's declared size) or ``MAX_PIXELS`` without one;
    ``max_image_pixels`` is ``MAX_IMAGE_PIXELS`` but at most ``max_pixels``; ``max_bytes`` what a raw
    request of ``max_pixels`` needs (4 base64 bytes a pixel, 4 KiB an image for its PNG header, prompt
    and metadata, 1 MiB) but at most ``MAX_BYTES``."""
    if max_pixels is None:
        max_pixels = min(MAX_PIXELS, max_batch * image_size**2) if image_size else MAX_PIXELS
    if max_image_pixels is None:
        max_image_pixels = min(MAX_IMAGE_PIXELS, max_pixels)
    if max_bytes is None:
        max_bytes = min(MAX_BYTES, 4 * max_pixels + 4096 * max_batch + 2**20)
    return {"max_batch": max_batch, "max_bytes": max_bytes, "max_pixels": max_pixels,
            "max_image_pixels": max_image_pixels}


class RewardServer(ThreadingHTTPServer):
    """An HTTP server holding one reward, serving ``workers`` connections at once; build it with ``make_server``."""

    daemon_threads = True  # idle keep-alive connections do not hold the process at exit
    request_queue_size = LISTEN_QUEUE  # connections that wait while every worker is busy

    def __init__(self, address: tuple[str, int], token: str | None, limits: dict[str, int], log: bool,
                 workers: int = WORKERS, max_decodes: int = MAX_DECODES) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.token, self.log = token, log
        self.limits = {**limits, "workers": workers, "max_decodes": max_decodes}
        self.reward: RewardCallable | None = None
        self.name = ""
        self.image_size: int | None = None  # the reward's declared image size, reported by /health
        self.score_lock = threading.Lock()  # one model: one batch at a time
        self.decode_slots = threading.BoundedSemaphore(max_decodes)  # decoded batches in memory at once
        self._workers = threading.BoundedSemaphore(workers)
        self._closing = threading.Event()
        self._busy = threading.Condition()
        self._active = 0
        self.served = {"requests": 0, "images": 0}
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a worker thread once fewer than ``workers`` are busy; until then the
        accept loop waits, and new connections wait in the listen queue."""
        while not self._workers.acquire(timeout=0.1):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            threading.Thread(target=self._work, args=(request, client_address), daemon=True,
                             name="tempflow-reward-worker").start()
        except BaseException:
            self._workers.release()
            self.shutdown_request(request)
            raise

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._workers.release()

    def shutdown(self) -> None:
        """Stop serving (a connection waiting for a worker is closed); requests in flight go on."""
        self._closing.set()
        super().shutdown()

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
                "limits": {**self.limits, "image_size": self.image_size}, "served": served}

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

    def decode_and_score(self, box: list[bytes]) -> tuple[list[float | None], list[dict]]:
        """Parse and decode a ``POST /score`` body (the one item of ``box``, taken out so that it is freed
        once parsed) and score it, holding one of the ``max_decodes`` slots from parsing until the scores
        are out, so that at most that many parsed and decoded requests exist at once."""
        with self.decode_slots:
            req = load_json(box.pop(), self.limits["max_batch"])
            images, prompts, metadata = read_request(req, self.limits["max_batch"], self.limits["max_pixels"],
                                                     self.limits["max_image_pixels"])
            del req
            return self.score(images, prompts, metadata), metadata

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

    def handle(self) -> None:
        """Serve the connection's requests; between two of them wait at most ``KEEPALIVE_IDLE`` s, so that
        an idle kept-alive connection does not hold a worker."""
        self.close_connection, self._idle = True, False
        self.handle_one_request()
        while not self.close_connection:
            self.connection.settimeout(KEEPALIVE_IDLE)
            self._idle = True
            self.handle_one_request()

    def parse_request(self) -> bool:
        """The request line has arrived: back to the read timeout for the headers and body."""
        self.connection.settimeout(self.timeout)
        self._idle = False
        return super().parse_request()

    def log_error(self, format: str, *args: Any) -> None:
        if not getattr(self, "_idle", False):  # an idle kept-alive connection closed is not an error
            super().log_error(format, *args)

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
            box = [self.rfile.read(length)]
            if len(box[0]) < length:  # the client went away mid-body
                self.close_connection = True
                return
            try:
                scores, metadata = self.server.decode_and_score(box)
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
                token: str | None = None, max_batch: int = MAX_BATCH, max_bytes: int | None = None,
                max_pixels: int | None = None, log: bool = False, reward_options: dict[str, Any] | None = None,
                name: str | None = None, max_image_pixels: int | None = None, workers: int = WORKERS,
                max_decodes: int = MAX_DECODES) -> RewardServer:
    """Bind a reward server (``port=0`` picks a free port; see ``server.url``) and build its reward.

    ``reward`` is a ``make_reward`` spec (``"shapes"``, ``"pickscore:1,aesthetic:0.5"``; with
    ``reward_options`` as its keyword arguments) or a reward function (it may carry ``image_size``).
    Limits left None get their defaults from the reward (``default_limits``). Call
    ``serve_forever()`` (in a thread in tests) or ``serve()``; ``shutdown()`` and ``server_close()`` stop it.
    """
    given = (("--max-batch", max_batch), ("--max-bytes", max_bytes), ("--max-pixels", max_pixels),
             ("--max-image-pixels", max_image_pixels), ("--workers", workers), ("--max-decodes", max_decodes))
    for what, value in given:
        if value is not None and value < 1:
            raise TempflowError(f"{what} must be >= 1, got {value}")
    if not 0 <= port <= 65535:
        raise TempflowError(f"--port must be in 0..65535 (0 picks a free one), got {port}")
    if token is not None and not token.strip():
        raise TempflowError("the token is empty; give a non-empty --token or leave it out")
    try:
        server = RewardServer((host, port), token.strip() if token else None, {}, log, workers, max_decodes)
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
        size = getattr(server.reward, "image_size", None)
        server.image_size = int(size) if isinstance(size, int) and size > 0 else None
        server.limits.update(default_limits(server.image_size, max_batch, max_pixels, max_image_pixels, max_bytes))
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
               max_batch: int = MAX_BATCH, max_bytes: int | None = None, max_pixels: int | None = None,
               quiet: bool = False, max_image_pixels: int | None = None, workers: int = WORKERS,
               max_decodes: int = MAX_DECODES) -> int:
    """``tempflow serve-reward``: build, announce, serve until a signal; returns the exit code."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    server = make_server(reward, host, port, token, max_batch, max_bytes, max_pixels, log=not quiet,
                         max_image_pixels=max_image_pixels, workers=workers, max_decodes=max_decodes)
    if not _is_loopback(host) and token is None:
        print(f"tempflow: warning: listening on {host} without a token; anyone who can reach this port can use "
              f"the reward (set {TOKEN_ENV})", file=sys.stderr)
    limits = server.limits
    print(f"serving reward {server.name!r} at {server.url} (POST /score, GET /health; token "
          f"{'required' if token else 'not required'}); Ctrl-C stops", flush=True)
    print(f"limits: {limits['max_batch']} images, {limits['max_pixels']} pixels ({limits['max_image_pixels']} an "
          f"image), {limits['max_bytes']} bytes a request; {limits['workers']} workers, at most "
          f"{limits['max_decodes']} requests decoded at once", flush=True)
    serve(server)
    print("reward server stopped", flush=True)
    return 0
