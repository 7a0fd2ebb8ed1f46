"""The reward server's memory for the largest request its limits allow, measured in a server process.

The peak resident memory (``VmHWM`` in ``/proc/PID/status``, reset through ``clear_refs`` after a
warm-up request) minus the resident memory before the request is the request's cost. The tests check
the bounds stated in docs/rewards.md; run this file to measure at the real defaults::

    .venv/bin/python tests/test_rewards_server_memory.py
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import random
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

MiB = 2**20
SRC = str(Path(__file__).resolve().parents[1] / "src")

# A server in its own process: a registered reward by name, or "mean", a reward that allocates nothing.
LAUNCH = """
import json, sys
from tempflow.rewards import server

reward, options = sys.argv[1], json.loads(sys.argv[2])
if reward == "mean":
    def mean(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))
    reward = mean
s = server.make_server(reward, port=0, **options)
print(s.url, json.dumps(s.limits), flush=True)
server.serve(s)
"""

def _can_reset_peaks() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM" in Path("/proc/self/status").read_text()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _can_reset_peaks(), reason="needs Linux /proc with clear_refs")


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@contextlib.contextmanager
def server_process(reward: str, **options) -> Iterator[tuple[subprocess.Popen, str, dict]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, reward, json.dumps(options)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        url, limits = proc.stdout.readline().split(" ", 1)
        yield proc, url, json.loads(limits)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def post(url: str, body: bytes) -> tuple[int, dict]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    return response.status, answer


def png(array: np.ndarray, level: int = 1) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=level)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def shapes_arrays(count: int, side: int) -> tuple[np.ndarray, list[str]]:
    """(count, side, side, 3) uint8 shapes scenes and their prompts."""
    from tempflow.worlds.shapes.prompts import random_spec
    from tempflow.worlds.shapes.scenes import render_batch, scene_for

    rng = random.Random(0)
    specs = [random_spec(rng) for _ in range(count)]
    images = render_batch([scene_for(s, rng) for s in specs], side)  # (count, 3, side, side) float32
    return (images * 255).round().astype(np.uint8).transpose(0, 2, 3, 1).copy(), [s.text() for s in specs]


def request(arrays: np.ndarray, prompts: list[str], encoding: str, fill_to: int = 0) -> bytes:
    """A POST /score body; with ``fill_to``, padded with metadata strings to that many bytes."""
    if encoding == "raw":
        images = {"encoding": "raw", "dtype": "uint8", "shape": list(arrays.shape),
                  "data": base64.b64encode(arrays.tobytes()).decode("ascii")}
    else:
        images = {"encoding": "png", "data": [png(a) for a in arrays]}
    body = {"images": images, "prompts": prompts, "metadata": [{"pad": ""} for _ in prompts]}
    size = len(json.dumps(body))
    each = max(0, fill_to - size - 64) // len(prompts)
    body["metadata"] = [{"pad": "x" * each} for _ in prompts]
    return json.dumps(body).encode()


def measure(proc: subprocess.Popen, url: str, body: bytes) -> tuple[int, float, dict]:
    """(peak resident memory increase in bytes, seconds, answer) of one request."""
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # the peak starts again from the current size
    before = status(proc.pid)["VmRSS"]
    start = time.perf_counter()
    code, answer = post(url, body)
    seconds = time.perf_counter() - start
    assert code == 200, answer
    return status(proc.pid)["VmHWM"] - before, seconds, answer


def measure_at_once(proc: subprocess.Popen, url: str, body: bytes, count: int) -> tuple[int, float]:
    """(peak resident memory increase in bytes, seconds) of ``count`` requests sent at once."""
    from concurrent.futures import ThreadPoolExecutor

    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
    before = status(proc.pid)["VmRSS"]
    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        assert all(code == 200 for code, _ in pool.map(lambda _: post(url, body), range(count)))
    return status(proc.pid)["VmHWM"] - before, time.perf_counter() - start


def warm_up(url: str) -> None:
    arrays, prompts = shapes_arrays(2, 32)
    for encoding in ("png", "raw"):
        code, answer = post(url, request(arrays, prompts, encoding))
        assert code == 200, answer


def bomb(side: int = 4096) -> bytes:
    """One flat side x side PNG: a 66 kB request for 4096x4096."""
    return json.dumps({"images": {"encoding": "png", "data": [png(np.zeros((side, side, 3), np.uint8), 9)]},
                       "prompts": ["a red circle"]}).encode()


# ---- the bounds of docs/rewards.md -------------------------------------------------------------------


SHAPES_BOUND = 256 * MiB  # shapes at its defaults (2^20 pixels, 6 MiB bodies), docs/rewards.md: measured 147-154 MiB


def test_shapes_at_its_defaults_stays_within_the_documented_bound():
    with server_process("shapes") as (proc, url, limits):
        assert limits["max_pixels"] == 256 * 64 * 64 and limits["max_image_pixels"] == 2**20
        warm_up(url)
        arrays, prompts = shapes_arrays(256, 64)  # the largest request: max_batch images of 64x64 ...
        body = request(arrays, prompts, "raw", fill_to=limits["max_bytes"] - 1024)  # ... in the largest body
        assert limits["max_bytes"] - 2048 < len(body) < limits["max_bytes"]
        grew, seconds, answer = measure(proc, url, body)
        assert len(answer["scores"]) == 256
        assert grew < SHAPES_BOUND, f"{grew / MiB:.0f} MiB"

        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        before = status(proc.pid)["VmRSS"]
        code, answer = post(url, bomb())  # refused from its header, before any decoding
        assert code == 413 and "--max-image-pixels" in answer["error"], answer
        assert status(proc.pid)["VmHWM"] - before < 16 * MiB


def main() -> None:
    """Measure the peak memory of the largest requests at the real defaults and print a table."""
    rows = []
    with server_process("shapes") as (proc, url, limits):
        warm_up(url)
        print(f"shapes, defaults {limits}", flush=True)
        arrays, prompts = shapes_arrays(256, 64)
        for encoding in ("raw", "png"):
            body = request(arrays, prompts, encoding, fill_to=limits["max_bytes"] - 1024)
            rows.append(("shapes", f"256 x 64x64, {encoding}", len(body), *measure(proc, url, body)[:2]))
        arrays, prompts = shapes_arrays(1, 1024)
        body = request(arrays, prompts, "png", fill_to=limits["max_bytes"] - 1024)
        rows.append(("shapes", "1 x 1024x1024, png", len(body), *measure(proc, url, body)[:2]))
    with server_process("shapes") as (proc, url, limits):  # a fresh process: nothing kept from the above
        warm_up(url)
        arrays, prompts = shapes_arrays(256, 64)
        body = request(arrays, prompts, "raw", fill_to=limits["max_bytes"] - 1024)
        n = limits["workers"]
        rows.append(("shapes", f"{n} at once: 256 x 64x64, raw", len(body), *measure_at_once(proc, url, body, n)))
    with server_process("mean") as (proc, url, limits):
        warm_up(url)
        print(f"a reward without image_size, defaults {limits}", flush=True)
        flat = np.full((1024, 1024, 3), 128, np.uint8)
        for count, side in ((64, 1024), (16, 2048)):
            arrays = np.broadcast_to(flat[:1, :1], (count, side, side, 3))
            body = request(arrays, ["p"] * count, "png", fill_to=limits["max_bytes"] - 4096)
            rows.append(("mean", f"{count} x {side}x{side}, png", len(body), *measure(proc, url, body)[:2]))
        side = 2048
        count = (limits["max_bytes"] - MiB) // (4 * side * side)
        rng = np.random.default_rng(0)
        arrays = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
        body = request(arrays, ["p"] * count, "raw", fill_to=limits["max_bytes"] - 4096)
        rows.append(("mean", f"{count} x {side}x{side}, raw", len(body), *measure(proc, url, body)[:2]))
    with server_process("mean") as (proc, url, limits):
        warm_up(url)
        arrays = np.broadcast_to(flat[:1, :1], (64, 1024, 1024, 3))
        body = request(arrays, ["p"] * 64, "png", fill_to=limits["max_bytes"] - 4096)
        n = limits["workers"]
        rows.append(("mean", f"{n} at once: 64 x 1024x1024, png", len(body), *measure_at_once(proc, url, body, n)))
    print(f"{'reward':<8}{'request':<36}{'body MiB':>10}{'peak increase MiB':>19}{'seconds':>9}")
    for reward, what, size, grew, seconds in rows:
        print(f"{reward:<8}{what:<36}{size / MiB:>10.1f}{grew / MiB:>19.0f}{seconds:>9.2f}")


if __name__ == "__main__":
    main()
