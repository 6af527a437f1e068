"""Issue 13 item 8: the real ``sd-engine serve`` process drains on SIGTERM or SIGINT. Readiness goes 503,
new generation requests get 503 JSON, every accepted request still completes with 200 and its images,
and the process exits 0; past ``--drain-timeout`` with work left it exits 1 (documented)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90
EXIT_TIMEOUT_S = 60
# Still running when the signal lands: a few seconds of work on the tiny engine per request.
LONG = {"steps": 20, "width": 128, "height": 128, "n_iter": 2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def serve(engine: Path, *options: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m engine.cli serve ENGINE --port P OPTIONS`` until ready; killed if the test leaves it."""
    port = free_port()
    command = [sys.executable, "-m", "engine.cli", "serve", str(engine), "--port", str(port), *options]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(url):
            if process.poll() is not None:
                raise AssertionError(
                    f"serve exited with {process.returncode}: {process.stderr.read()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("serve did not become ready")
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=EXIT_TIMEOUT_S)


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/health/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def in_flight(url: str) -> float:
    """Requests queued or running, from /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    names = ("sd_engine_queue_depth", "sd_engine_running_requests")
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in names
    )


class Requests:
    """Long txt2img requests, each in its own thread; ``answers[i]``: (status, images) for a 200,
    (status, detail) for an error answer, (None, the exception) when the connection failed."""

    def __init__(self, url: str, count: int, body: dict[str, Any]) -> None:
        self.answers: dict[int, Any] = {}
        self.threads = [
            threading.Thread(target=self._send, args=(url, i, {**body, "prompt": f"drain {i}", "seed": i}))
            for i in range(count)
        ]
        for thread in self.threads:
            thread.start()
        wait_for(lambda: in_flight(url) == count, f"{count} requests to be accepted")

    def _send(self, url: str, i: int, body: dict[str, Any]) -> None:
        try:
            response = requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=120)
        except requests.RequestException as error:
            self.answers[i] = (None, repr(error))
            return
        answer = response.json()
        self.answers[i] = (response.status_code, answer["images"] if response.ok else answer["detail"])

    def pending(self) -> int:
        return sum(thread.is_alive() for thread in self.threads)

    def join(self) -> dict[int, Any]:
        for thread in self.threads:
            thread.join(timeout=120)
        return self.answers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_accepted_work_and_exits_0(tiny_engine: Path, sig: signal.Signals) -> None:
    with serve(tiny_engine, "--drain-timeout", "60") as (process, url):
        work = Requests(url, 3, LONG)
        process.send_signal(sig)
        wait_for(lambda: requests.get(url + "/health/ready", timeout=5).status_code == 503, "readiness 503")
        late = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "late", "steps": 1}, timeout=30)
        late_openai = requests.post(url + "/v1/images/generations", json={"prompt": "late"}, timeout=30)
        still_running = work.pending()
        assert late.status_code == 503 and late.json()["error"] == "draining", late.text
        assert "shutting down" in late.json()["detail"] and late.headers["Retry-After"]
        assert late_openai.status_code == 503 and late_openai.json()["error"]["code"] == "draining"
        assert still_running > 0, "the work ended before the drain was observed: make LONG longer"
        answers = work.join()
        assert {i: status for i, (status, _) in answers.items()} == {0: 200, 1: 200, 2: 200}, answers
        assert all(len(images) == LONG["n_iter"] for _, images in answers.values())
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
        assert process.returncode == 0, stderr[-2000:]
        assert "draining" in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_drain_timeout_cancels_the_work_left_and_exits_1(tiny_engine: Path) -> None:
    """Documented: past --drain-timeout the work left is cancelled, its clients get a 503 JSON, exit 1."""
    with serve(tiny_engine, "--drain-timeout", "1") as (process, url):
        work = Requests(url, 2, {**LONG, "steps": 100})  # far more than a second of work
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
        assert process.returncode == 1, stderr[-2000:]
        assert "drain timeout: cancelling 2 requests" in stderr, stderr[-2000:]
        answers = work.join()  # cancelled at its next step, not run to the end
        for status, detail in answers.values():
            assert status == 503 and "server stopped" in detail, (status, detail)


def test_a_second_signal_stops_at_once_with_503s_and_exit_1(tiny_engine: Path) -> None:
    """The first signal drains; a second one cancels the work left at its next step: its clients get a
    503 JSON (not a 500 or a cut connection), no traceback, and exit 1 (work was left)."""
    with serve(tiny_engine, "--drain-timeout", "60") as (process, url):
        work = Requests(url, 2, {**LONG, "steps": 100})
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: requests.get(url + "/health/ready", timeout=5).status_code == 503, "readiness 503")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
        assert process.returncode == 1, stderr[-2000:]
        assert "second signal" in stderr and "Traceback" not in stderr, stderr[-2000:]
        for status, detail in work.join().values():
            assert status == 503 and "server stopped" in detail, (status, detail)


def test_a_default_model_that_cannot_load_ends_the_server_in_one_line(tiny_engine: Path) -> None:
    """A backend this machine lacks: the server does not sit there unready; one line, exit 1."""
    port = free_port()
    command = [sys.executable, "-m", "engine.cli", "serve", str(tiny_engine), "--port", str(port)]
    result = subprocess.run(
        [*command, "--backend", "tensorrt"], cwd=REPO, capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sd-engine: error: the default model failed to load:"), last
