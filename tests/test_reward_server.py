import base64
import contextlib
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from tempflow.cli import main
from tempflow.errors import TempflowError
from tempflow.rewards import make_reward
from tempflow.rewards import remote as remote_mod
from tempflow.rewards import server as server_mod
from tempflow.rewards.remote import RemoteReward, RewardServerError, encode_images, expand_url_form, to_uint8
from tempflow.rewards.server import PNG_SIGNATURE, jsonable, make_server
from tempflow.worlds.shapes.prompts import random_spec
from tempflow.worlds.shapes.scenes import render_batch, scene_for


@contextlib.contextmanager
def running(reward="shapes", **kwargs):
    server = make_server(reward, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def stub(status, body):
    """A tiny HTTP server answering every POST with ``status`` and ``body``, whatever was asked."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def shapes_batch(n, seed=0, res=32):
    rng = random.Random(seed)
    specs = [random_spec(rng) for _ in range(n)]
    images = torch.from_numpy(render_batch([scene_for(s, rng) for s in specs], res))  # (n, 3, res, res)
    return images, [s.text() for s in specs]


def post(server, body, headers=None, path="/score"):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    return response.status, answer, response


def request_body(images, prompts, encoding="raw", **extra):
    return json.dumps({"images": encode_images(to_uint8(images), encoding), "prompts": prompts, **extra}).encode()


def quantised(images):
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float().div(255)


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's backoff waits instead of sleeping (only in the client: servers may sleep)."""
    waits = []
    monkeypatch.setattr(remote_mod, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


# ---- scores and the wire format ----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_scores_through_the_server_equal_scores_in_process(encoding):
    images, prompts = shapes_batch(12)
    prompts[3] = prompts[4]  # one wrong caption, so the scores are not all 1
    local_meta = [{} for _ in prompts]
    local = make_reward("shapes")(images, prompts, local_meta)
    assert local.min() < 1
    with running("shapes") as server:
        meta = [{"seed": i} for i in range(len(prompts))]
        got = make_reward("remote", url=server.url, encoding=encoding, batch_size=5)(images, prompts, meta)
    assert got.dtype == torch.float32 and torch.equal(got, local)
    assert [m["category"] for m in meta] == [m["category"] for m in local_meta]
    assert [m["seed"] for m in meta] == list(range(len(prompts)))
    assert meta[0]["rewards"]["shapes"] == local[0].item() and meta[0]["rewards"]["remote"] == got[0].item()


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_pixels_arrive_exactly_in_both_encodings(encoding):
    def checksum(images, prompts, metadata):  # sensitive to every pixel, its channel and position
        weights = torch.arange(images[0].numel(), dtype=torch.float64).reshape(images.shape[1:]) % 7 + 1
        return (images.double() * weights).sum(dim=(1, 2, 3)).float()

    images = torch.rand(5, 3, 12, 20)  # not square: rows and columns cannot be swapped unnoticed
    with running(checksum) as server:
        got = RemoteReward(server.url, encoding=encoding, batch_size=2)(images, ["p"] * 5)
    assert torch.equal(got, checksum(quantised(images), [], []))


def test_health_names_the_reward_and_its_limits():
    with running("shapes", max_batch=7, token="t") as server:
        health = RemoteReward(server.url).health()  # no token needed
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
        conn.request("GET", "/score")
        with conn.getresponse() as response:
            assert response.status == 405 and response.headers["Allow"] == "POST"
        conn.close()
    assert health["status"] == "ok" and health["reward"] == "shapes" and health["version"]
    assert health["limits"]["max_batch"] == 7 and set(health["encodings"]) == {"png", "raw"}


def test_non_finite_scores_and_images_come_back_as_nan():
    seen = []

    def some_nan(images, prompts, metadata):
        seen.append(len(prompts))
        return torch.tensor([0.5, float("nan"), float("inf"), 1.0])[: len(prompts)]

    images = torch.rand(4, 3, 8, 8)
    images[3, 0, 1, 1] = float("nan")
    with running(some_nan) as server:
        status, answer, _ = post(server, request_body(images.nan_to_num(), ["p"] * 4))
        got = RemoteReward(server.url)(images, ["p"] * 4)
        images[:] = float("inf")
        assert RemoteReward(server.url)(images, ["p"] * 4).isnan().all()
    assert status == 200 and answer["scores"] == [0.5, None, None, 1.0]
    assert got[0] == 0.5 and got[1:].isnan().all()
    assert seen == [4, 3]  # the image with a NaN pixel is not sent; a batch of such images sends nothing


def test_jsonable_keeps_json_and_drops_the_rest():
    value = {"a": float("nan"), "b": torch.tensor(2.0), "c": [1, object()], "d": object(), "e": torch.zeros(10**5)}
    assert jsonable(value) == {"a": None, "b": 2.0, "c": [1, None]}


# ---- refusals ---------------------------------------------------------------------------------


def test_bad_token_is_401_and_the_client_does_not_retry(sleeps, monkeypatch):
    images, prompts = shapes_batch(2)
    with running("shapes", token="s3cret") as server:
        status, answer, response = post(server, request_body(images, prompts), {"Authorization": "Bearer nope"})
        assert status == 401 and answer["error"] == "wrong token" and response.headers["WWW-Authenticate"] == "Bearer"
        assert post(server, request_body(images, prompts))[0] == 401  # no token at all
        with pytest.raises(RewardServerError, match=r"refused the token \(HTTP 401.*TEMPFLOW_REWARD_TOKEN"):
            RemoteReward(server.url, token="nope", retries=3)(images, prompts)
        assert sleeps == []
        monkeypatch.setenv("TEMPFLOW_REWARD_TOKEN", "s3cret")
        assert RemoteReward(server.url)(images, prompts).shape == (2,)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda body: b"{not json", "not valid JSON"),
        (lambda body: b"[1, 2]", "must be a JSON object"),
        (lambda body: {**body, "extra": 1}, "unknown field 'extra'"),
        (lambda body: {"prompts": body["prompts"]}, "missing field 'images'"),
        (lambda body: {**body, "prompts": [1, 2]}, "prompts must be a list of strings"),
        (lambda body: {**body, "prompts": []}, "no prompts"),
        (lambda body: {**body, "prompts": body["prompts"][:1]}, "2 images but 1 prompts"),
        (lambda body: {**body, "metadata": [{}]}, "metadata must be a list of 2"),
        (lambda body: {**body, "images": {**body["images"], "data": "@@@"}}, "not a base64 string"),
        (lambda body: {**body, "images": {**body["images"], "data": "AAAA"}}, "holds 3 bytes"),
        (lambda body: {**body, "images": {**body["images"], "shape": [2, 8, 8]}}, "images.shape must be"),
        (lambda body: {**body, "images": {**body["images"], "dtype": "float32"}}, "images.dtype must be 'uint8'"),
        (lambda body: {**body, "images": {**body["images"], "encoding": "jpeg"}}, "unknown images.encoding"),
        (lambda body: {**body, "images": {"encoding": "png", "data": ["AAAA", "AAAA"]}}, "image 0 is not a readable"),
        (lambda body: {**body, "prompts": ["a photo of a cat", "a circle"]}, "the reward refused the request"),
    ],
)
def test_malformed_requests_are_400_with_a_reason(edit, needle):
    images, prompts = shapes_batch(2, res=8)
    body = edit(json.loads(request_body(images, prompts)))
    with running("shapes") as server:
        status, answer, _ = post(server, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert status == 400 and needle in answer["error"], answer


def test_oversized_requests_are_413(sleeps):
    images, prompts = shapes_batch(6)
    with running("shapes", max_bytes=2000, max_batch=4, max_pixels=32 * 32 * 3) as server:
        status, answer, _ = post(server, b"x" * 50_000)
        assert status == 413 and "--max-bytes" in answer["error"]
        server.limits["max_bytes"] = 10**6
        assert post(server, request_body(images[:4], prompts[:4]))[1]["error"].endswith("(--max-pixels)")
        with pytest.raises(RewardServerError, match=r"HTTP 413.*--max-batch\).*lower batch_size \(now 6\)"):
            RemoteReward(server.url, batch_size=6)(images, prompts)
        assert sleeps == []
        assert RemoteReward(server.url, batch_size=3)(images[:3], prompts[:3]).shape == (3,)


def test_reward_exception_is_500_and_retried(sleeps):
    def broken(images, prompts, metadata):
        raise RuntimeError("out of memory")

    with running(broken) as server:
        status, answer, _ = post(server, request_body(torch.rand(1, 3, 8, 8), ["p"]))
        assert status == 500 and answer["error"] == "the reward failed: RuntimeError: out of memory"
        with pytest.raises(RewardServerError, match=r"after 3 attempts \(HTTP 500: the reward failed.*server's log"):
            RemoteReward(server.url, retries=2, backoff=0.1)(torch.rand(1, 3, 8, 8), ["p"])
    assert sleeps == [0.1, 0.2]


# ---- resources -----------------------------------------------------------------------------------


def test_default_limits_follow_the_reward_and_health_reports_them():
    def plain(images, prompts, metadata):
        return torch.zeros(len(prompts))

    with running("shapes") as server:
        shapes = RemoteReward(server.url).health()["limits"]
    assert shapes == {"max_batch": 256, "max_pixels": 256 * 64 * 64, "max_image_pixels": 2**20,
                      "max_bytes": 4 * 2**20 + 256 * 4096 + 2**20, "workers": 8, "max_decodes": 2, "image_size": 64}
    with running(plain, max_batch=10, workers=3, max_decodes=1) as server:
        assert server.limits == {"max_batch": 10, "max_pixels": 2**26, "max_image_pixels": 2048 * 2048,
                                 "max_bytes": 128 * 2**20, "workers": 3, "max_decodes": 1}
        assert RemoteReward(server.url).health()["limits"]["image_size"] is None
    plain.image_size = 32  # a reward's own declaration
    with running(plain, max_batch=10, max_image_pixels=100) as server:
        assert (server.limits["max_pixels"], server.limits["max_image_pixels"]) == (10 * 32 * 32, 100)
        assert server.limits["max_bytes"] == 4 * 10 * 32 * 32 + 10 * 4096 + 2**20
    with running("shapes,jpeg_compressibility", max_pixels=5000) as server:  # a term without a size: any size
        assert server.image_size is None and server.limits["max_image_pixels"] == 5000


def png_header(width, height):
    """The first 33 bytes of a PNG declaring width x height (RGB, 8 bit), then bytes that are no image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0" * 4 + b"no image data follows" * 3


@pytest.mark.parametrize(
    "sizes,status,needle",
    [
        ([(100_000, 100_000)], 413, "100000x100000 = 10000000000 pixels, over this server's limit of 4096 pixels "
                                    "per image (--max-image-pixels)"),
        ([(64, 64)] * 3, 413, "3 images of 64x64 have 12288 pixels in all, over this server's limit of 10000 "
                              "(--max-pixels)"),
        ([(64, 64), (32, 64)], 400, "image 1 is 32x64 but image 0 is 64x64"),
        ([(0, 5)], 400, "declares 0x5 pixels"),
    ],
)
def test_png_sizes_are_refused_from_their_headers_before_decoding(sizes, status, needle, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image, "open", no_decoding)
    data = [base64.b64encode(png_header(w, h)).decode() for w, h in sizes]
    body = json.dumps({"images": {"encoding": "png", "data": data}, "prompts": ["p"] * len(data)}).encode()
    with running("shapes", max_pixels=10_000, max_image_pixels=4096) as server:
        code, answer, _ = post(server, body)
    assert code == status and needle in answer["error"], answer


def test_not_a_png_and_a_header_that_lies_are_400():
    images, prompts = shapes_batch(2, res=16)
    body = json.loads(request_body(images, prompts, "png"))
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16)).save(jpeg, format="JPEG")
    liar = base64.b64decode(body["images"]["data"][1])
    liar = liar[:16] + struct.pack(">II", 8, 32) + liar[24:]  # declares 8x32, holds 16x16
    with running("shapes") as server:
        body["images"]["data"] = [base64.b64encode(jpeg.getvalue()).decode(), body["images"]["data"][1]]
        code, answer, _ = post(server, json.dumps(body).encode())
        assert code == 400 and "image 0 is not a readable PNG (it does not start with the PNG" in answer["error"]
        body["images"]["data"] = [base64.b64encode(liar).decode()] * 2
        code, answer, _ = post(server, json.dumps(body).encode())
        assert code == 400 and "image 0 is not a readable PNG" in answer["error"], answer


def test_raw_images_are_refused_from_their_shape():
    body = json.dumps({"images": {"encoding": "raw", "dtype": "uint8", "shape": [1, 3000, 3000, 3], "data": ""},
                       "prompts": ["p"]}).encode()
    with running(lambda images, prompts, metadata: torch.zeros(len(prompts))) as server:
        code, answer, _ = post(server, body)
    assert code == 413 and "(--max-image-pixels)" in answer["error"]


def test_json_values_are_bounded_before_parsing():
    images, prompts = shapes_batch(2, res=8)
    body = json.loads(request_body(images, prompts))
    body["metadata"] = [{"x": [0] * 6000}, {}]  # over 1024 values an image of the largest batch, 4 (+ 1)
    with running("shapes", max_batch=4) as server:
        code, answer, _ = post(server, json.dumps(body).encode())
    assert code == 413 and "about 6017 JSON values" in answer["error"], answer
    assert "limit of 1024 an image (5120 with --max-batch 4); send less metadata" in answer["error"]


def worker_threads():
    return sum(t.name == "tempflow-reward-worker" for t in threading.enumerate())


def wait_for(condition, timeout=10.0):
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        time.sleep(0.02)


def test_workers_bound_the_threads_and_further_connections_wait():
    release = threading.Event()

    def held(images, prompts, metadata):
        release.wait(10)
        return torch.zeros(len(prompts))

    with running(held, workers=3, max_decodes=1) as server, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(RemoteReward(server.url, retries=0), torch.rand(1, 3, 8, 8), ["p"]) for _ in range(6)]
        wait_for(lambda: worker_threads() == 3)
        time.sleep(0.3)  # the other three connections are made and wait for a worker
        assert worker_threads() == 3 and not any(f.done() for f in futures)
        release.set()
        assert all(f.result(timeout=10).tolist() == [0.0] for f in futures)
        assert server.served["requests"] == 6


@pytest.mark.parametrize("max_decodes", [1, 2])
def test_decodes_are_bounded(max_decodes, monkeypatch):
    decoding = []
    read_request = server_mod.read_request

    def counted(*args, **kwargs):
        decoding.append(1)
        return read_request(*args, **kwargs)

    monkeypatch.setattr(server_mod, "read_request", counted)
    release = threading.Event()

    def held(images, prompts, metadata):
        release.wait(10)
        return torch.zeros(len(prompts))

    with running(held, max_decodes=max_decodes) as server, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(RemoteReward(server.url, retries=0), torch.rand(1, 3, 8, 8), ["p"]) for _ in range(3)]
        wait_for(lambda: len(decoding) == max_decodes)
        time.sleep(0.3)
        assert len(decoding) == max_decodes  # one is scored, one more may be decoded, the rest wait undecoded
        release.set()
        assert all(f.result(timeout=10).tolist() == [0.0] for f in futures) and len(decoding) == 3


def test_an_idle_kept_alive_connection_frees_its_worker(monkeypatch):
    monkeypatch.setattr(server_mod, "KEEPALIVE_IDLE", 0.3)
    with running("shapes", workers=1) as server:
        idle = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
        idle.request("GET", "/health")
        with idle.getresponse() as response:
            assert response.status == 200 and response.headers.get("Connection") != "close"
            response.read()
        start = time.perf_counter()
        assert RemoteReward(server.url).health()["status"] == "ok"  # the one worker comes free
        assert time.perf_counter() - start < 3
        idle.close()


# ---- failures of the server ------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_retries_with_backoff_then_names_the_url(sleeps, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardServerError) as info:
        RemoteReward(url, retries=3, backoff=0.25)(torch.rand(2, 3, 8, 8), ["a", "b"])
    message = str(info.value)
    assert sleeps == [0.25, 0.5, 1.0]
    assert url in message and "after 4 attempts" in message and "tempflow serve-reward" in message
    assert "\n" not in message
    lines = capsys.readouterr().err.splitlines()  # one line a retry, none for the final failure
    assert len(lines) == 3
    assert lines[0].startswith(f"tempflow: reward server {url}: retrying in 0.25 s (attempt 2 of 4): ")
    assert "retrying in 1 s (attempt 4 of 4): " in lines[2] and "refused" in lines[2].lower()


def test_slow_server_times_out_after_retries():
    def slow(images, prompts, metadata):
        time.sleep(0.6)
        return torch.zeros(len(prompts))

    with running(slow) as server:
        start = time.perf_counter()
        with pytest.raises(RewardServerError, match=r"after 2 attempts \(timed out after 0.2 s\); raise timeout="):
            RemoteReward(server.url, timeout=0.2, retries=1, backoff=0.01)(torch.rand(1, 3, 8, 8), ["p"])
        assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    "status,body,needle",
    [
        (200, b"<html>hello</html>", "not JSON"),
        (200, b'{"scores": [1.0]}', "1 scores for 2 images"),
        (200, b'{"scores": ["a", "b"]}', "not a number"),
        (200, b'{"result": [1, 2]}', "without a list of scores"),
        (200, b'{"scores": [1, 2], "metadata": "x"}', "metadata that is not a list"),
        (404, b"not found", "HTTP 404: not found"),
    ],
)
def test_garbage_answers_raise_a_clear_error(status, body, needle, sleeps):
    with stub(status, body) as url, pytest.raises(RewardServerError, match=re.escape(needle)):
        RemoteReward(url, retries=2)(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert sleeps == []


# ---- concurrency, the URL form, options ------------------------------------------------------------


def test_parallel_batches_and_submit_give_the_same_result_as_one_batch():
    images, prompts = shapes_batch(11)
    prompts[0] = prompts[1]
    with running("shapes") as server:
        whole = RemoteReward(server.url, batch_size=100)(images, prompts)
        with RemoteReward(server.url, batch_size=3, concurrency=4) as client:
            meta = [{} for _ in prompts]
            parallel = client(images, prompts, meta)
            future = client.submit(images, prompts)
            assert torch.equal(future.result(timeout=10), whole)
        assert server.served["requests"] == 1 + 4 + 4
    assert torch.equal(parallel, whole) and whole[0] < 1
    assert all("category" in m for m in meta)


def test_url_form_and_option_form_of_the_spec():
    assert expand_url_form("remote@http://h:8000") == "remote(url=http://h:8000)"
    assert expand_url_form("shapes:1, remote@http://h:8000/") == "shapes:1,remote(url=http://h:8000/)"
    images, prompts = shapes_batch(3)
    with running("shapes") as server:
        by_url = make_reward(f"remote@{server.url}")(images, prompts)
        by_option = make_reward(f"remote(url={server.url}/score, encoding=raw):2")(images, prompts)
    assert torch.equal(by_url, make_reward("shapes")(images, prompts)) and torch.equal(by_option, 2 * by_url)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({}, "needs the server's url"),
        ({"url": "127.0.0.1:8000"}, "bad reward server url"),
        ({"url": "http://h:8000:0.5"}, "with a weight: remote(url="),
        ({"url": "http://h:1", "encoding": "jpeg"}, "encoding must be one of png, raw"),
        ({"url": "http://h:1", "batch_size": 0}, "batch_size must be >= 1"),
        ({"url": "http://h:1", "batchsize": 3}, "has no option 'batchsize'"),
    ],
)
def test_bad_client_options(kwargs, needle):
    with pytest.raises(TempflowError, match=re.escape(needle)):
        make_reward("remote", **kwargs)


# ---- the command ---------------------------------------------------------------------------------


def test_cli_errors_are_one_line(capsys):
    for flag in ("--workers", "--max-decodes", "--max-image-pixels"):
        assert main(["serve-reward", "--reward", "shapes", "--port", "0", flag, "0"]) == 2
        assert f"{flag} must be >= 1" in capsys.readouterr().err
    assert main(["serve-reward", "--reward", "no_such_reward", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("tempflow: error: unknown reward 'no_such_reward'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve-reward", "--reward", "shapes", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is in use; pick another --port" in err
    assert main(["serve-reward", "--reward", "shapes", "--port", "0", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


def test_cli_serves_until_sigterm():
    command = [sys.executable, "-m", "tempflow", "serve-reward", "--reward", "shapes", "--port", "0",
               "--max-decodes", "1"]
    env = {**os.environ, "TEMPFLOW_REWARD_TOKEN": "t"}  # the token out of the process list
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            url = re.search(r"http://\S+", proc.stdout.readline()).group(0)
            assert proc.stdout.readline().strip() == (
                "limits: 256 images, 1048576 pixels (1048576 an image), 6291456 bytes a request; 8 workers, "
                "at most 1 requests decoded at once")
            images, prompts = shapes_batch(2)
            assert RemoteReward(url, token="t")(images, prompts).tolist() == [1.0, 1.0]
            with pytest.raises(RewardServerError, match="401"):
                RemoteReward(url, token="wrong")(images, prompts)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert "stopped" in proc.stdout.read()
            log = proc.stderr.read()
            assert '"POST /score HTTP/1.1" 200' in log and "Traceback" not in log
        finally:
            if proc.poll() is None:
                proc.kill()


def test_cli_help_states_the_server_defaults():
    from tempflow.cli import build_parser
    from tempflow.rewards import server

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["serve-reward"]
    text = " ".join(sub.format_help().split())  # independent of the terminal width
    assert server.MAX_BATCH == 256 and "(default 256)" in text
    assert server.MAX_BYTES == 128 * 2**20 and "at most 128 MiB)" in text
    assert server.MAX_PIXELS == 2**26 and "else 2^26)" in text and "64x64 for shapes" in text
    assert server.MAX_IMAGE_PIXELS == 2048 * 2048 and "(default 2048x2048 = 2^22" in text
    assert server.WORKERS == 8 and "more wait (default 8)" in text
    assert server.MAX_DECODES == 2 and "decodes" in text and "(default 2)" in text
    assert "TEMPFLOW_REWARD_TOKEN=... tempflow serve-reward" in text and "process list" in text
