"""The ``remote`` reward: scores images with a reward server started by ``tempflow serve-reward``.

Three ways to name it::

    make_reward("remote", url="http://127.0.0.1:8000", batch_size=16, concurrency=2)
    reward: remote@http://127.0.0.1:8000                               # config, the URL form
    reward: remote(url=http://gpu-box:8000, encoding=raw):1,jpeg_compressibility:0.1

The URL form ``remote@URL`` takes the defaults for every other option; for options or a weight,
write ``remote(url=URL, option=value, ...):weight``. Keep the token out of config files: set
``TEMPFLOW_REWARD_TOKEN`` (read by both the server and the client) instead of ``token=``.

Options: ``url`` (http or https, with or without ``/score``), ``token`` (Bearer token; default
``$TEMPFLOW_REWARD_TOKEN``), ``batch_size`` (images per request), ``concurrency`` (requests in flight
at once; the server scores one at a time, so this overlaps encoding and transfer with scoring),
``timeout`` (seconds per socket operation: waiting for the answer includes the time other requests
hold the server, so allow ``concurrency`` times the time of one batch), ``retries`` and ``backoff``
(retry after ``backoff * 2**k`` s, or the server's Retry-After, on connection errors, time-outs,
HTTP 5xx and 429; never on other 4xx; each retry prints one line to stderr), ``encoding`` (``png``,
lossless and small, or ``raw`` uint8 bytes, larger but without encoding time). Proxies from the
environment are not used.

Images are sent as 8 bit, ``round(255 x)``, as every image reward quantises them anyway; an image
with a NaN or infinite pixel is not sent and scores NaN (the reward layer's rule,
``tempflow.rewards.spec.finite_images``). A score the server sends as ``null`` becomes NaN. The
metadata the server answers (e.g. ``category`` for ``shapes``) is merged into the caller's dicts.
Failures raise ``RewardServerError`` with a one-line message; the wire protocol is described in
``tempflow.rewards.server``.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tempflow.errors import TempflowError
from tempflow.rewards.server import TOKEN_ENV, jsonable
from tempflow.rewards.spec import finite_images

ENCODINGS = ("png", "raw")
MAX_BACKOFF = 30.0  # seconds, the longest wait between two attempts
_URL_TERM = re.compile(r"\s*remote@(\S+?)\s*")


@dataclass
class _Job:
    """What a call sends: the finite images as uint8 (copied), their rows in the call, and their prompts
    and metadata dicts (the caller's own)."""

    pixels: np.ndarray  # (F, H, W, 3) uint8
    rows: list[int]  # F rows of the B images of the call
    total: int  # B
    prompts: list[str]
    metadata: list[dict]


class RewardServerError(TempflowError):
    """The reward server cannot be reached, refused the request, or answered something unusable."""


class _Retry(Exception):
    """A failure worth another attempt: reason, kind (connection | timeout | server) and the server's Retry-After."""

    def __init__(self, reason: str, kind: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.retry_after = reason, kind, retry_after


def expand_url_form(spec: str) -> str:
    """Rewrite each ``remote@URL`` term of a reward spec as ``remote(url=URL)``; other terms are kept."""
    return ",".join(f"remote(url={m.group(1)})" if (m := _URL_TERM.fullmatch(t)) else t for t in spec.split(","))


def base_url(url: str) -> str:
    """``http[s]://host:port[/prefix]`` without a trailing ``/`` or ``/score``; TempflowError if it is not one."""
    bad = TempflowError(f"bad reward server url {url!r}; write http://HOST:PORT, e.g. remote@http://127.0.0.1:8000 "
                        "(with a weight: remote(url=http://127.0.0.1:8000):0.5)")
    if not isinstance(url, str):
        raise bad
    parts = urllib.parse.urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise bad
    path = parts.path.rstrip("/")
    path = path[: -len("/score")] if path.endswith("/score") else path
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, ``round(255 x)``; non-finite pixels become 0."""
    x = images.detach().float().nan_to_num(0.0, 0.0, 0.0).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, 3)


def encode_images(pixels: np.ndarray, encoding: str) -> dict[str, Any]:
    """(B, H, W, 3) uint8 -> the ``images`` field of a ``POST /score`` request."""
    if encoding == "raw":
        data = base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode("ascii")
        return {"encoding": "raw", "dtype": "uint8", "shape": list(pixels.shape), "data": data}
    from PIL import Image

    out = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {"encoding": "png", "data": out}


def _merge(meta: dict, answer: dict) -> None:
    for key, value in answer.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key].update(value)
        else:
            meta[key] = value


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except Exception:
        text = body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
        return text or "no reason given"


class RemoteReward:
    """A RewardFn backed by a reward server (see the module docstring for the options)."""

    def __init__(self, url: str, token: str | None = None, batch_size: int = 32, concurrency: int = 1,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.5, encoding: str = "png") -> None:
        checks = [(batch_size >= 1, "batch_size must be >= 1"), (concurrency >= 1, "concurrency must be >= 1"),
                  (timeout > 0, "timeout must be > 0 seconds"), (retries >= 0, "retries must be >= 0"),
                  (backoff >= 0, "backoff must be >= 0 seconds"),
                  (encoding in ENCODINGS, f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")]
        for ok, message in checks:
            if not ok:
                raise TempflowError(f"remote reward: {message}")
        self.url = base_url(url)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.batch_size, self.concurrency, self.timeout = int(batch_size), int(concurrency), float(timeout)
        self.retries, self.backoff, self.encoding = int(retries), float(backoff), encoding
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._lock = threading.Lock()
        self._pools: dict[str, ThreadPoolExecutor] = {}

    # ---- the RewardFn ------------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], B prompts, B metadata dicts -> (B,) float32 scores."""
        return self._score(self._prepare(images, prompts, metadata))

    def submit(self, images: torch.Tensor, prompts: list[str],
               metadata: list[dict] | None = None) -> Future[torch.Tensor]:
        """Score in the background: a Future of the (B,) scores, so that sampling can go on meanwhile.

        The images are copied before this returns; the metadata dicts are updated when the Future completes.
        Submissions are scored in order.
        """
        job = self._prepare(images, prompts, metadata)
        return self._pool("submit", 1).submit(self._score, job)

    def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` answer (reward, version, limits)."""
        raw = self._request("/health", None)
        try:
            return json.loads(raw)
        except ValueError:
            raise RewardServerError(f"the reward server at {self.url} answered /health with something that is "
                                    f"not JSON; is it a tempflow reward server?") from None

    def close(self) -> None:
        """Stop the background threads (they also end with the interpreter)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RemoteReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- batching ----------------------------------------------------------------------------------

    def _pool(self, name: str, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if name not in self._pools:
                self._pools[name] = ThreadPoolExecutor(workers, thread_name_prefix=f"tempflow-remote-{name}")
            return self._pools[name]

    def _prepare(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None) -> _Job:
        if images.ndim != 4 or images.shape[1] != 3:
            raise TempflowError(f"reward 'remote' expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        if not len(prompts) == len(metadata) == images.shape[0]:
            raise TempflowError(f"reward 'remote' got {images.shape[0]} images, {len(prompts)} prompts and "
                                f"{len(metadata)} metadata dicts; give one of each per image")
        finite = finite_images(images)  # (B,): only these are sent
        rows = finite.nonzero().flatten().tolist()
        shown = images if len(rows) == len(prompts) else images[finite.to(images.device)]
        return _Job(to_uint8(shown), rows, len(prompts), [prompts[i] for i in rows], [metadata[i] for i in rows])

    def _score(self, job: _Job) -> torch.Tensor:
        starts = list(range(0, len(job.rows), self.batch_size))
        sent = [jsonable(m) for m in job.metadata]

        def one(lo: int) -> tuple[list[float], list[dict] | None]:
            hi = lo + self.batch_size
            return self._post(job.pixels[lo:hi], job.prompts[lo:hi], sent[lo:hi])

        if self.concurrency > 1 and len(starts) > 1:
            answers = list(self._pool("batches", self.concurrency).map(one, starts))
        else:
            answers = [one(lo) for lo in starts]
        for lo, (_, meta) in zip(starts, answers):
            for target, got in zip(job.metadata[lo:], meta or []):
                _merge(target, got)
        scores = torch.full((job.total,), float("nan"), dtype=torch.float32)  # (B,), NaN where not sent
        if job.rows:
            scores[job.rows] = torch.tensor([s for batch, _ in answers for s in batch], dtype=torch.float32)
        return scores

    def _post(self, pixels: np.ndarray, prompts: list[str], metadata: list[Any]) -> tuple[list[float], list | None]:
        body = json.dumps({"images": encode_images(pixels, self.encoding), "prompts": prompts,
                           "metadata": metadata}).encode()
        return self._parse_answer(self._request("/score", body), len(prompts))

    def _parse_answer(self, raw: bytes, count: int) -> tuple[list[float], list[dict] | None]:
        def fail(what: str) -> RewardServerError:
            return RewardServerError(f"the reward server at {self.url} answered {what}; is it a tempflow reward "
                                     "server of the same version?")

        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            text = raw[:60].decode("utf-8", "replace").replace("\n", " ")
            raise fail(f"with something that is not JSON ({text!r})") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list):
            raise fail("without a list of scores")
        scores, meta = answer["scores"], answer.get("metadata")
        if len(scores) != count:
            raise fail(f"{len(scores)} scores for {count} images")
        for s in scores:
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
                raise fail(f"a score that is not a number ({str(s)[:40]!r})")
        if meta is not None and (not isinstance(meta, list) or len(meta) != count
                                 or not all(isinstance(m, dict) for m in meta)):
            raise fail(f"metadata that is not a list of {count} objects")
        return [math.nan if s is None else float(s) for s in scores], meta

    # ---- HTTP --------------------------------------------------------------------------------------

    def _request(self, path: str, body: bytes | None) -> bytes:
        """GET (body None) or POST ``path``, retrying transient failures with exponential backoff."""
        for attempt in range(self.retries + 1):
            try:
                return self._once(path, body)
            except _Retry as e:
                last = e
            if attempt < self.retries:
                delay = min(max(self.backoff * 2**attempt, last.retry_after or 0.0), MAX_BACKOFF)
                print(f"tempflow: reward server {self.url}: retrying in {delay:g} s (attempt {attempt + 2} of "
                      f"{self.retries + 1}): {last.reason}", file=sys.stderr, flush=True)
                time.sleep(delay)
        hint = {"timeout": f"raise timeout= (now {self.timeout:g} s) if the reward needs longer",
                "server": "see the server's log",
                "connection": f"start it with `tempflow serve-reward --reward NAME --port {self._port()}` or fix url="}
        raise RewardServerError(f"no usable answer from the reward server at {self.url} after {self.retries + 1} "
                                f"attempt{'s' if self.retries else ''} ({last.reason}); {hint[last.kind]}")

    def _port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def _once(self, path: str, body: bytes | None) -> bytes:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=body, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            try:
                reason = _error_text(e.read())
            except OSError:
                reason = e.reason or "no reason given"
            if e.code == 429 or e.code >= 500:
                retry_after = e.headers.get("Retry-After", "")
                raise _Retry(f"HTTP {e.code}: {reason}", "server",
                             float(retry_after) if retry_after.isdigit() else None) from None
            raise RewardServerError(self._refused(e.code, reason)) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Retry(f"timed out after {self.timeout:g} s", "timeout") from None
            raise _Retry(str(e.reason), "connection") from None
        except TimeoutError:
            raise _Retry(f"timed out after {self.timeout:g} s", "timeout") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retry(f"{type(e).__name__}: {e}", "connection") from None

    def _refused(self, code: int, reason: str) -> str:
        where = f"the reward server at {self.url}"
        if code == 401:
            return (f"{where} refused the token (HTTP 401: {reason}); pass the --token it was started with "
                    f"as token= or in {TOKEN_ENV}")
        if code == 413:
            return (f"{where} refused the request as too large (HTTP 413: {reason}); lower batch_size (now "
                    f"{self.batch_size}) or start the server with a larger value of the flag named there")
        if code == 404:
            return f"{where} has no such endpoint (HTTP 404: {reason}); is it a tempflow reward server?"
        return f"{where} rejected the request (HTTP {code}: {reason})"


def make_remote_reward(url: str | None = None, token: str | None = None, batch_size: int = 32, concurrency: int = 1,
                       timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                       encoding: str = "png") -> RemoteReward:
    """The ``remote`` reward: a client of ``tempflow serve-reward`` at ``url`` (options in the module docstring)."""
    if not url:
        raise TempflowError("reward 'remote' needs the server's url: remote@http://HOST:PORT in a config, or "
                            "make_reward('remote', url='http://HOST:PORT')")
    return RemoteReward(url, token, batch_size, concurrency, timeout, retries, backoff, encoding)
