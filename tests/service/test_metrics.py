"""Issue 13 items 4 and 6: /metrics in Prometheus format whose counters balance with what the clients saw
(received == succeeded + failed + rejected, per api), a queued request whose client disconnects is
dropped before it starts and counted as cancelled, and dynamic batching: compatible queued requests run as
one UNet batch and every image is still the solo image of its seed."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import LiveServer

KEY = "metrics-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"steps": 1, "width": 64, "height": 64}
APIS = ("a1111_txt2img", "a1111_img2img", "openai_generations", "openai_edits")
SETTLE_S = 30.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def png_b64(side: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 120, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def scrape(live: LiveServer, headers: dict[str, str] | None = None) -> tuple[set[str], Samples]:
    """(family names, {(sample name, labels): value}) of GET /metrics, parsed by prometheus-client."""
    response = requests.get(live.url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}
    return {family.name for family in families}, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, got), value in samples.items() if sample == name and wanted <= got)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = SETTLE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def raw_post(live: LiveServer, path: str, body: dict[str, Any], headers: dict[str, str]) -> socket.socket:
    """A complete POST on a raw socket, left open: the test closes it to disconnect."""
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{live.port}", "Content-Type: application/json"]
    lines += [f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    sock.sendall("\r\n".join(lines).encode() + data)
    return sock


class Background:
    """A request in a thread; ``response`` once it answered."""

    def __init__(self, send: Callable[[], requests.Response]) -> None:
        self.response: requests.Response | None = None
        self.thread = threading.Thread(target=self._run, args=(send,), daemon=True)
        self.thread.start()

    def _run(self, send: Callable[[], requests.Response]) -> None:
        self.response = send()

    def result(self, timeout: float = 120) -> requests.Response:
        self.thread.join(timeout)
        assert self.response is not None, "the request did not answer"
        return self.response


class Client:
    """Sends requests and tallies what it saw, per api: statuses and images received."""

    def __init__(self, live: LiveServer) -> None:
        self.live = live
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.images = 0
        self.lock = threading.Lock()

    def post(
        self, api: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> requests.Response:
        response = requests.post(self.live.url + path, headers=headers, timeout=120, **kwargs)
        self.record(api, response)
        return response

    def record(self, api: str, response: requests.Response) -> None:
        with self.lock:
            self.statuses[(api, response.status_code)] += 1
            if response.status_code == 200:
                body = response.json()
                self.images += len(body["data"] if api.startswith("openai") else body["images"])

    def count(self, api: str, *statuses: int) -> int:
        return sum(n for (a, status), n in self.statuses.items() if a == api and status in statuses)


def send_mix(client: Client) -> None:
    """Successes, invalid requests and unauthorized ones on every generation route."""
    image = png_b64()
    edit_image = {"image": ("in.png", base64.b64decode(image), "image/png")}
    edit_fields = {"prompt": "a fox", "size": "64x64", "steps": "2"}
    txt, img = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
    gen, edit = "/v1/images/generations", "/v1/images/edits"
    img_body = {"prompt": "a fox", "init_images": [image], "denoising_strength": 1.0, **SMALL}
    ok = [
        client.post(
            "a1111_txt2img", txt, AUTH, json={"prompt": "a fox", "batch_size": 2, "seed": 1, **SMALL}
        ),
        client.post("a1111_img2img", img, AUTH, json=img_body),
        client.post(
            "openai_generations", gen, AUTH, json={"prompt": "a fox", "size": "64x64", "steps": 1, "n": 2}
        ),
        client.post("openai_edits", edit, AUTH, data=edit_fields, files=edit_image),
    ]
    assert [r.status_code for r in ok] == [200] * 4, [r.text[:200] for r in ok]
    invalid = [
        client.post("a1111_txt2img", txt, AUTH, json={**SMALL, "steps": 0}),
        client.post("a1111_img2img", img, AUTH, json={**img_body, "init_images": ["!!"]}),
        client.post("openai_generations", gen, AUTH, json={"prompt": "a", "size": "65x64"}),
        client.post("openai_edits", edit, AUTH, data=edit_fields),
    ]
    assert [r.status_code for r in invalid] == [422, 422, 400, 400], [r.text[:200] for r in invalid]
    anonymous = [
        client.post("a1111_txt2img", txt, json=SMALL),
        client.post("a1111_img2img", img, {"Authorization": "Bearer wrong"}, json=img_body),
        client.post("openai_generations", gen, json={"prompt": "a"}),
        client.post("openai_edits", edit, data=edit_fields, files=edit_image),
    ]
    assert [r.status_code for r in anonymous] == [401] * 4


def test_metrics_balance_with_what_the_clients_saw(make_server) -> None:
    live = make_server(api_key=KEY, max_queue=1)
    names, before = scrape(live, AUTH)
    for family in (
        "sd_engine_http_requests",
        "sd_engine_queue_depth",
        "sd_engine_running_requests",
        "sd_engine_batch_images",
        "sd_engine_queue_wait_seconds",
        "sd_engine_generation_seconds",
        "sd_engine_request_seconds",
        "sd_engine_images",
        "sd_engine_unet_steps",
        "sd_engine_steps_per_second",
        "sd_engine_ready",
    ):
        assert family in names, family
    assert total(before, "sd_engine_images_total") == 0
    assert total(before, "sd_engine_ready") == 1
    client = Client(live)
    send_mix(client)

    # a long request runs; one more waits (the queue holds 1); a third is refused with 429
    txt = "/sdapi/v1/txt2img"
    long_body = {"prompt": "long", "steps": 100, "width": 256, "height": 256, "seed": 5}
    running = Background(lambda: requests.post(live.url + txt, json=long_body, headers=AUTH, timeout=120))
    wait_for(
        lambda: total(scrape(live, AUTH)[1], "sd_engine_running_requests") == 1, "the long request to run"
    )
    queued = raw_post(live, txt, {"prompt": "queued then gone", **SMALL}, AUTH)
    wait_for(lambda: live.state.scheduler.queued_jobs() == 1, "the second request to queue")
    assert total(scrape(live, AUTH)[1], "sd_engine_queue_depth") == 1
    refused = client.post("a1111_txt2img", txt, AUTH, json=SMALL)
    refused_openai = client.post("openai_generations", "/v1/images/generations", AUTH, json={"prompt": "a"})
    for response in (refused, refused_openai):
        assert response.status_code == 429, response.text[:200]
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    queued.shutdown(socket.SHUT_RDWR)
    queued.close()
    wait_for(lambda: live.state.scheduler.queued_jobs() == 0, "the disconnected request to be dropped")
    assert live.state.scheduler.busy(), "the long request should still be running"
    assert requests.post(live.url + "/sdapi/v1/interrupt", headers=AUTH, timeout=30).status_code == 200
    client.record("a1111_txt2img", running.result())
    assert running.result().status_code == 200, running.result().text[:200]
    client.statuses[("a1111_txt2img", 499)] += 1  # what the server answered the client that left

    sent = sum(client.statuses.values())
    wait_for(
        lambda: total(scrape(live, AUTH)[1], "sd_engine_requests_received_total") == sent, "the counters"
    )
    _, after = scrape(live, AUTH)
    for api in APIS:
        received = total(after, "sd_engine_requests_received_total", api=api)
        succeeded = total(after, "sd_engine_requests_succeeded_total", api=api)
        failed = total(after, "sd_engine_requests_failed_total", api=api)
        rejected = total(after, "sd_engine_requests_rejected_total", api=api)
        assert received == succeeded + failed + rejected, (api, received, succeeded, failed, rejected)
        assert received == client.count(api, *range(100, 600)), api
        assert succeeded == client.count(api, 200), api
        unauthorized = total(after, "sd_engine_requests_rejected_total", api=api, reason="unauthorized")
        assert unauthorized == client.count(api, 401), api
        assert total(after, "sd_engine_requests_rejected_total", api=api, reason="invalid") == client.count(
            api, 400, 422
        ), api
        full = total(after, "sd_engine_requests_rejected_total", api=api, reason="queue_full")
        assert full == client.count(api, 429), api
    cancelled = total(after, "sd_engine_requests_failed_total", api="a1111_txt2img", reason="cancelled")
    assert cancelled == 1
    for (api, status), count in client.statuses.items():
        route = {"a1111_txt2img": txt, "a1111_img2img": "/sdapi/v1/img2img"}.get(
            api, "/v1/images/" + api.removeprefix("openai_")
        )
        http = total(after, "sd_engine_http_requests_total", route=route, method="POST", status=str(status))
        assert http == count, (route, status)

    # the dropped request never started: no queue wait, no images, no batch of its own
    started = sum(client.count(api, 200) for api in APIS)
    assert total(after, "sd_engine_queue_wait_seconds_count") == started
    assert total(after, "sd_engine_images_total") == client.images
    assert total(after, "sd_engine_batch_images_sum") == client.images
    batches = total(after, "sd_engine_batch_images_count")
    assert batches == started  # one after another, each accepted request ran as its own batch
    assert total(after, "sd_engine_generation_seconds_count") == batches
    assert total(after, "sd_engine_generation_seconds_sum") > 0
    assert total(after, "sd_engine_unet_steps_total") > 0
    assert total(after, "sd_engine_steps_per_second") > 0
    assert total(after, "sd_engine_queue_depth") == 0
    assert total(after, "sd_engine_running_requests") == 0


def test_request_latency_histogram_moves(server: LiveServer) -> None:
    _, before = scrape(server)
    assert server.post("/sdapi/v1/txt2img", json={"prompt": "latency", **SMALL}).status_code == 200
    wait_for(
        lambda: (
            total(scrape(server)[1], "sd_engine_request_seconds_count", api="a1111_txt2img")
            > total(before, "sd_engine_request_seconds_count", api="a1111_txt2img")
        ),
        "the request latency histogram",
        timeout=1.5,
    )


def batches_of(before: Samples, after: Samples, images: int) -> float:
    """Batches of exactly ``images`` images observed between two scrapes (the histogram's buckets are
    1, 2, 3, 4, ...: the count below ``images`` subtracted from the count up to it)."""

    def bucket(samples: Samples, le: float) -> float:
        return total(samples, "sd_engine_batch_images_bucket", le=str(float(le)))

    return (
        bucket(after, images)
        - bucket(before, images)
        - (bucket(after, images - 1) - bucket(before, images - 1))
    )


def test_compatible_requests_share_a_batch_and_keep_their_solo_images(make_server, tiny_engine: Path) -> None:
    from engine import Pipeline

    live = make_server(max_batch=4, batch_window_ms=300.0)
    txt = "/sdapi/v1/txt2img"
    base = {"steps": 2, "width": 64, "height": 64, "cfg_scale": 7.0, "sampler_name": "Euler a"}
    compatible = [{**base, "prompt": f"a fox number {i}", "seed": 100 + i} for i in range(4)]
    incompatible = [
        {**base, "prompt": "more steps", "seed": 7, "steps": 3},
        {**base, "prompt": "wider", "seed": 8, "width": 128},
    ]
    _, before = scrape(live)
    blocker = Background(
        lambda: live.post(txt, json={"prompt": "blocker", "steps": 100, "width": 256, "height": 256})
    )
    wait_for(lambda: live.state.board.read().job != "", "the blocker to run")
    pending = [Background(lambda body=body: live.post(txt, json=body)) for body in compatible + incompatible]
    wait_for(lambda: live.state.scheduler.queued_jobs() == len(pending), "the requests to queue")
    assert live.post("/sdapi/v1/interrupt").status_code == 200
    assert blocker.result().status_code == 200
    responses = [p.result() for p in pending]
    assert [r.status_code for r in responses] == [200] * len(pending), [r.text[:200] for r in responses]
    _, after = scrape(live)
    assert batches_of(before, after, 4) == 1
    new = total(after, "sd_engine_batch_images_count") - total(before, "sd_engine_batch_images_count")
    assert new == 1 + 1 + len(incompatible)  # blocker, the shared batch, each incompatible request alone

    pipe = Pipeline.load(tiny_engine)
    for body, response in zip(compatible + incompatible, responses, strict=True):
        (image,) = response.json()["images"]
        solo = pipe.generate(
            body["prompt"],
            steps=body["steps"],
            guidance_scale=body["cfg_scale"],
            width=body["width"],
            height=body["height"],
            sampler="Euler a",
            seed=body["seed"],
        )
        assert np.array_equal(decode(image), np.asarray(solo.images[0].convert("RGB"))), body["prompt"]

    # the window: requests that arrive within batch_window_ms of the first join its batch
    _, before = scrape(live)
    start = threading.Barrier(4)

    def send(body: dict[str, Any]) -> requests.Response:
        start.wait()
        return live.post(txt, json=body)

    window = [Background(lambda body=body: send({**body, "seed": body["seed"] + 50})) for body in compatible]
    assert [w.result().status_code for w in window] == [200] * 4
    _, after = scrape(live)
    batches = total(after, "sd_engine_batch_images_count") - total(before, "sd_engine_batch_images_count")
    assert batches <= 2, f"4 concurrent compatible requests ran as {batches} batches with a 300 ms window"
