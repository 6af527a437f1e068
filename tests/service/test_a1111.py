"""A1111's API with the real clients (webuiapi 0.9.17, unmodified, and requests) against a live server on
127.0.0.1 over the tiny engine.

Every image must equal, pixel for pixel, ``Pipeline.load(tiny_engine).generate(...)`` with the same
settings (A1111's cfg_scale is guidance_scale; img2img's denoising_strength is strength and its init
image the one the client sent, resized the way A1111 resizes it). Then the replays of public reports
against other SD servers (issue 13, item 10), one test each: sampler names, /progress while a run goes
on, interrupt and skip, null fields, coercion, init image handling, unsupported scripts and features,
batches split past the server's micro-batch, seeds, override_settings.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from engine import GenerationResult, Pipeline
from engine.pipeline.images import to_pil
from engine.pipeline.request import StepInfo
from tests.conftest import draw_seed

API = "/sdapi/v1"
TXT2IMG = f"{API}/txt2img"
IMG2IMG = f"{API}/img2img"
PROMPT = "a lighthouse on a cliff at dusk"
# Small runs: the tiny engine at 64 px and a few steps. A1111's cfg_scale is the pipeline's guidance_scale.
SMALL = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 6.0, "sampler_name": "Euler a"}
# A run that lasts (about a second per iteration on 2 cores): progress, interrupt and skip.
LONG = {"width": 128, "height": 128, "steps": 30, "cfg_scale": 7.0, "sampler_name": "Euler a"}
POLL_S = 0.1
A1111_CFG, A1111_SAMPLER, A1111_STEPS = 7.0, "Euler", 50  # A1111's API defaults


# -- references and helpers ---------------------------------------------------------------------------


def settings_of(body: dict[str, Any]) -> dict[str, Any]:
    """An A1111 body's generation settings as Pipeline.generate keywords (cfg_scale -> guidance_scale)."""
    settings = {
        name: body[name] for name in ("width", "height", "steps", "seed", "batch_size") if name in body
    }
    settings["guidance_scale"] = body.get("cfg_scale", A1111_CFG)
    settings["sampler"] = body.get("sampler_name") or A1111_SAMPLER
    return settings


@dataclass
class References:
    """Pipeline.generate on the engine the server serves, each distinct call made once per module."""

    pipe: Pipeline
    cache: dict[str, GenerationResult] = field(default_factory=dict)

    def result(self, prompt: str = PROMPT, negative_prompt: str = "", **settings: Any) -> GenerationResult:
        """``image`` (img2img) may be a PIL image."""
        image = settings.get("image")
        plain = sorted((k, v) for k, v in settings.items() if k != "image")
        key = repr((prompt, negative_prompt, plain))
        key += "" if image is None else hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.pipe.generate(prompt, negative_prompt, **settings)
        return self.cache[key]

    def images(self, prompt: str = PROMPT, negative_prompt: str = "", **settings: Any) -> list[np.ndarray]:
        """The generated images as HxWx3 uint8 arrays."""
        return [np.asarray(image) for image in self.result(prompt, negative_prompt, **settings).images]

    def infotexts(self, prompt: str = PROMPT, negative_prompt: str = "", **settings: Any) -> list[str]:
        result = self.result(prompt, negative_prompt, **settings)
        return [result.infotext(i) for i in range(len(result.images))]

    def solo(self, seed: int, **settings: Any) -> np.ndarray:
        """The one image ``seed`` gives alone (batch_size 1)."""
        return self.images(seed=seed, batch_size=1, **settings)[0]


def decode(text: str) -> Image.Image:
    """A base64 PNG from a response."""
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "PNG"
    return image


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def assert_same_images(got: list[Image.Image], want: list[np.ndarray]) -> None:
    """Equal pixel for pixel, in order."""
    assert len(got) == len(want), f"{len(got)} images, expected {len(want)}"
    for i, (image, expected) in enumerate(zip(got, want, strict=True)):
        assert image.mode == "RGB", f"image {i} is {image.mode}"
        array = np.asarray(image)
        assert array.shape == expected.shape, f"image {i}: shape {array.shape}, expected {expected.shape}"
        differ = int((array != expected).any(axis=-1).sum())
        worst = int(np.abs(array.astype(int) - expected.astype(int)).max())
        assert differ == 0, f"image {i}: {differ} pixels differ (by up to {worst})"


def response_images(response: requests.Response) -> list[Image.Image]:
    assert response.status_code == 200, response.text[:500]
    return [decode(text) for text in response.json()["images"]]


def info_of(response: requests.Response) -> dict[str, Any]:
    return json.loads(response.json()["info"])


def assert_error(response: requests.Response, status: int | tuple[int, ...], *named: str) -> dict[str, Any]:
    """A 4xx JSON answer whose text names each of ``named``."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    text = json.dumps(body)
    for name in named:
        assert name in text, f"{name!r} not named in {text}"
    return body


def a1111_resize(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's img2img resize (modules/images.py ``resize_image``, no upscaler), the reference: 0 stretch
    (Lanczos), 1 crop and resize, 2 resize and fill (the bands are the edge rows or columns stretched by
    Pillow's default bicubic over a zero-size box)."""
    if mode == 0:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), (0, 0))
        edge = (0, resized.height, width, resized.height)
        out.paste(resized.resize((width, fill), box=edge), (0, fill + src_h))
    elif mode == 2 and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), (0, 0))
        edge = (resized.width, 0, resized.width, height)
        out.paste(resized.resize((fill, height), box=edge), (fill + src_w, 0))
    return out


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth random colours (noise upscaled): an init image the tiny VAE encodes to something non-trivial."""
    coarse = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


def draw(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31))


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(tiny_engine: Path) -> References:
    return References(Pipeline.load(tiny_engine))


@pytest.fixture(scope="module")
def api(server) -> webuiapi.WebUIApi:
    """webuiapi as its users make it (its own defaults: sampler "Euler a", scheduler "automatic")."""
    return webuiapi.WebUIApi(baseurl=server.url + API, sampler="Euler a", steps=4)


@pytest.fixture
def idle(server) -> Iterator[None]:
    """The shared server idle before and after (a run left over from a failed test would skew timing)."""
    assert server.state.scheduler.wait_idle(60)
    yield
    assert server.state.scheduler.wait_idle(60)


@dataclass(frozen=True)
class LongRun:
    """The reference for LONG runs at ``seed`` (n_iter 2: seeds seed, seed + 1): the latents after every
    step of the first image (an interrupted or skipped chunk's image is one of them, decoded), and both
    full images."""

    seed: int
    pipe: Pipeline
    latents: list[np.ndarray]
    full: list[np.ndarray]

    def body(self, **changes: Any) -> dict[str, Any]:
        return {"prompt": PROMPT, **LONG, "seed": self.seed, "n_iter": 2, **changes}

    def stopped_at(self, image: Image.Image, from_step: int) -> int | None:
        """The step (>= from_step) whose latents decode to ``image``, or None."""
        array = np.asarray(image)
        for step in range(max(from_step, 1), len(self.latents) + 1):
            decoded = np.asarray(to_pil(self.pipe.decode(self.latents[step - 1]))[0])
            if np.array_equal(decoded, array):
                return step
        return None


@pytest.fixture(scope="module")
def long_run(ref: References) -> LongRun:
    seed = draw_seed() % 2**31
    print(f"long run seed {seed}")
    latents: list[np.ndarray] = []

    def keep(info: StepInfo) -> None:
        latents.append(np.array(info.latents, copy=True))

    settings = settings_of({**LONG, "seed": seed})
    first = ref.pipe.generate(PROMPT, on_step=keep, **settings)
    second = ref.solo(seed + 1, **{k: v for k, v in settings.items() if k != "seed"})
    return LongRun(seed, ref.pipe, latents, [np.asarray(first.images[0]), second])


def read_progress(session: requests.Session, url: str, image: bool = False) -> dict[str, Any]:
    """One GET /sdapi/v1/progress (``skip_current_image`` unless ``image``)."""
    params = {} if image else {"skip_current_image": "true"}
    answer = session.get(url + f"{API}/progress", params=params, timeout=10)
    assert answer.status_code == 200, answer.text[:300]
    return answer.json()


def poll_until(session: requests.Session, url: str, done: Callable[[dict[str, Any]], bool]) -> dict:
    """GET /progress every 10 ms until ``done(answer)``; fails after 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = read_progress(session, url)
        if done(progress):
            return progress
        time.sleep(0.01)
    raise AssertionError("the run never reached the awaited progress")


def running_first_iteration(step: int) -> Callable[[dict[str, Any]], bool]:
    def check(progress: dict[str, Any]) -> bool:
        state = progress["state"]
        return bool(state["job"]) and state["job_no"] == 0 and state["sampling_step"] >= step

    return check


# -- webuiapi: txt2img, img2img, listings, options, png-info -------------------------------------------


def test_webuiapi_txt2img_equals_pipeline(api: webuiapi.WebUIApi, ref: References, rng) -> None:
    seed = draw(rng)
    result = api.txt2img(
        prompt=PROMPT, negative_prompt="fog", seed=seed, batch_size=2, **{**SMALL, "cfg_scale": 5.5}
    )
    settings = settings_of({**SMALL, "cfg_scale": 5.5, "seed": seed, "batch_size": 2})
    assert_same_images(result.images, ref.images(PROMPT, "fog", **settings))
    info = result.info
    assert (info["seed"], info["all_seeds"]) == (seed, [seed, seed + 1])
    assert info["prompt"] == PROMPT and info["negative_prompt"] == "fog"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 4, 5.5)
    assert info["sampler_name"] == "Euler a" and info["interrupted"] is False
    assert info["infotexts"] == ref.infotexts(PROMPT, "fog", **settings)
    for i, image in enumerate(result.images):
        assert image.info["parameters"] == info["infotexts"][i]  # the PNG carries its infotext
        assert f"Seed: {seed + i}, " in image.info["parameters"]
    assert result.parameters["prompt"] == PROMPT and result.parameters["seed"] == seed


@pytest.mark.parametrize(
    ("mode", "strength", "size"),
    [(0, 0.75, (48, 96)), (1, 0.5, (48, 96)), (1, 0.5, (96, 40)), (2, 0.5, (48, 96)), (2, 0.75, (96, 40))],
    ids=["just-resize", "crop-portrait", "crop-landscape", "fill-portrait", "fill-landscape"],
)
def test_webuiapi_img2img_equals_pipeline(
    api: webuiapi.WebUIApi, ref: References, rng, mode: int, strength: float, size: tuple[int, int]
) -> None:
    seed, init = draw(rng), random_image(rng, *size)
    result = api.img2img(
        images=[init], resize_mode=mode, denoising_strength=strength, prompt=PROMPT, seed=seed, **SMALL
    )
    settings = {**settings_of({**SMALL, "seed": seed}), "strength": strength}
    expected = ref.images(PROMPT, image=a1111_resize(init, mode, 64, 64), **settings)
    assert_same_images(result.images, expected)
    assert result.info["denoising_strength"] == strength
    assert f"Denoising strength: {strength}" in result.images[0].info["parameters"]
    assert result.info["infotexts"] == ref.infotexts(
        PROMPT, image=a1111_resize(init, mode, 64, 64), **settings
    )


def test_resize_modes_differ(ref: References, rng) -> None:
    """The three modes make three different init images (else the test above could not tell them apart)."""
    init = random_image(rng, 48, 96)
    resized = [np.asarray(a1111_resize(init, mode, 64, 64)) for mode in (0, 1, 2)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(resized) for b in resized[i + 1 :])


def test_webuiapi_lists_samplers_and_schedulers(api: webuiapi.WebUIApi) -> None:
    samplers = {entry["name"]: entry for entry in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    assert api.util_get_sampler_names() == sorted(samplers)
    schedulers = {entry["name"]: entry for entry in api.get_schedulers()}
    assert {"automatic", "uniform", "karras", "exponential"} <= set(schedulers)
    assert schedulers["karras"]["label"] == "Karras"


def test_every_listed_sampler_runs_as_the_pipeline(
    server, api: webuiapi.WebUIApi, ref: References, rng
) -> None:
    """/samplers lists only names that work, each the engine's sampler of that name."""
    seed = draw(rng)
    for name in api.util_get_sampler_names():
        body = {"prompt": PROMPT, **SMALL, "steps": 2, "sampler_name": name, "seed": seed}
        response = server.post(TXT2IMG, json=body)
        try:
            assert_same_images(response_images(response), ref.images(**settings_of(body)))
        except AssertionError as error:
            raise AssertionError(f"sampler {name!r}: {error}") from None


def test_every_listed_scheduler_is_accepted(server, api: webuiapi.WebUIApi, rng) -> None:
    seed = draw(rng)
    for name in api.util_get_scheduler_names():
        body = {"prompt": PROMPT, **SMALL, "steps": 3, "sampler_name": "DPM++ 2M", "scheduler": name}
        response = server.post(TXT2IMG, json={**body, "seed": seed})
        assert response.status_code == 200, (name, response.text[:300])


def test_webuiapi_options_and_clip_skip(server, api: webuiapi.WebUIApi, ref: References, rng) -> None:
    """CLIP_stop_at_last_layers set through options changes the image exactly as clip_skip does."""
    seed = draw(rng)
    settings = settings_of({**SMALL, "seed": seed})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1
    try:
        api.set_options({"CLIP_stop_at_last_layers": 2})
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        skipped = api.txt2img(prompt=PROMPT, seed=seed, **SMALL)
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    assert_same_images(skipped.images, ref.images(clip_skip=2, **settings))
    assert skipped.info["clip_skip"] == 2 and "Clip skip: 2" in skipped.images[0].info["parameters"]
    plain = api.txt2img(prompt=PROMPT, seed=seed, **SMALL)
    assert_same_images(plain.images, ref.images(clip_skip=1, **settings))
    assert not np.array_equal(np.asarray(plain.image), np.asarray(skipped.image))


@pytest.mark.parametrize("value", [0, 13, "two", None])
def test_bad_clip_skip_option_is_refused(server, value: Any) -> None:
    response = server.post(f"{API}/options", json={"CLIP_stop_at_last_layers": value})
    assert_error(response, 422, "CLIP_stop_at_last_layers")
    assert server.get(f"{API}/options").json()["CLIP_stop_at_last_layers"] == 1


def test_webuiapi_png_info_reads_the_infotext(api: webuiapi.WebUIApi, rng) -> None:
    seed = draw(rng)
    image = api.txt2img(prompt=PROMPT, negative_prompt="fog", seed=seed, **SMALL).image
    answer = api.png_info(image)
    assert answer.info == image.info["parameters"]
    assert answer.parameters["Prompt"] == PROMPT and answer.parameters["Negative prompt"] == "fog"
    assert answer.parameters["Seed"] == str(seed) and answer.parameters["Size"] == "64x64"
    bare = api.png_info(Image.new("RGB", (8, 8)))
    assert bare.info == "" and bare.parameters == {}


def test_webuiapi_lists_and_switches_models(make_server, tiny_engine: Path, tmp_path: Path, ref, rng) -> None:
    """Two engine folders: util_get_model_names lists both; util_set_model (options) switches the default,
    override_settings switches one request only; an unknown name is a 404 naming it."""
    other = tmp_path / "other"
    shutil.copytree(tiny_engine, other, ignore=shutil.ignore_patterns("manifest.json", ".cache"))
    manifest = json.loads((tiny_engine / "manifest.json").read_text())
    manifest["source"].update(name="other-model", sha256="ab" * 32, short_hash="abababab12")
    (other / "manifest.json").write_text(json.dumps(manifest))
    live = make_server(engines=(tiny_engine, other))
    client = webuiapi.WebUIApi(baseurl=live.url + API, sampler="Euler a", steps=4)
    models = client.get_sd_models()
    titles = [model["title"] for model in models]
    assert client.util_get_model_names() == sorted(titles) and len(set(titles)) == 2
    assert [model["model_name"] for model in models][1] == "other-model"
    assert client.util_get_current_model() == titles[0]

    seed = draw(rng)
    expected = ref.images(**settings_of({**SMALL, "seed": seed}))  # the same weights under both names
    client.util_set_model(titles[1])
    assert client.util_get_current_model() == titles[1]
    assert client.get_options()["sd_checkpoint_hash"] == "ab" * 32
    switched = client.txt2img(prompt=PROMPT, seed=seed, **SMALL)
    assert_same_images(switched.images, expected)
    assert (
        switched.info["sd_model_name"] == "other-model"
        and "Model: other-model" in switched.info["infotexts"][0]
    )
    assert "other" in live.state.pool.loaded()

    body = {"prompt": PROMPT, **SMALL, "seed": seed, "override_settings": {"sd_model_checkpoint": titles[0]}}
    once = live.post(TXT2IMG, json=body)
    assert_same_images(response_images(once), expected)
    assert info_of(once)["sd_model_name"] == models[0]["model_name"]
    assert client.util_get_current_model() == titles[1]  # restored afterwards, as A1111 does

    unknown = live.post(f"{API}/options", json={"sd_model_checkpoint": "no-such-model"})
    assert_error(unknown, 404, "no-such-model", "sd_model_checkpoint")
    assert client.util_get_current_model() == titles[1]


# -- progress, interrupt and skip --------------------------------------------------------------------


def test_progress_polled_during_a_run(server, api: webuiapi.WebUIApi, long_run: LongRun, idle) -> None:
    """/progress every 100 ms during a 30-step n_iter 2 run: quick answers (it never waits on the worker),
    sampling_step climbing through both iterations, progress rising inside (0, 1], a decodable preview
    when asked and none when not; idle afterwards. The run's images are the full images of both seeds."""
    session = requests.Session()
    polls: list[tuple[float, bool, dict[str, Any]]] = []
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(server.post, TXT2IMG, json=long_run.body())
        while not run.done():
            with_image = len(polls) % 2 == 0
            began = time.perf_counter()
            # webuiapi's get_progress asks for the preview; every other poll skips it
            answer = api.get_progress() if with_image else read_progress(session, server.url)
            latency = time.perf_counter() - began
            polls.append((latency, with_image, answer))
            time.sleep(max(0.0, POLL_S - latency))
        response = run.result()
    assert_same_images(response_images(response), long_run.full)

    latencies = [latency for latency, _, _ in polls]
    assert statistics.median(latencies) < 0.1, f"median {statistics.median(latencies):.3f} s"
    assert max(latencies) < 0.5, f"slowest answer {max(latencies):.3f} s"

    running = [(with_image, answer) for _, with_image, answer in polls if answer["state"]["job"]]
    assert len(running) >= 4, f"only {len(running)} of {len(polls)} polls saw the run"
    first_running = polls.index(next(p for p in polls if p[2]["state"]["job"]))
    last_running = max(i for i, p in enumerate(polls) if p[2]["state"]["job"])
    assert all(p[2]["state"]["job"] for p in polls[first_running : last_running + 1]), "idle mid-run"
    states = [answer["state"] for _, answer in running]
    assert {(s["job"], s["job_count"], s["sampling_steps"]) for s in states} == {("txt2img", 2, 30)}
    positions = [(s["job_no"], s["sampling_step"]) for s in states]
    assert positions == sorted(positions) and len(set(positions)) >= 4, positions
    assert {s["job_no"] for s in states} == {0, 1}, f"iterations seen: {positions}"
    progress = [answer["progress"] for _, answer in running]
    assert progress == sorted(progress)
    for (_, answer), (job_no, step) in zip(running, positions, strict=True):
        if job_no or step:
            assert 0 < answer["progress"] <= 1
        if (job_no or step) and (job_no, step) < (1, 30):
            assert answer["progress"] < 1 and answer["eta_relative"] > 0, (job_no, step, answer)
    for with_image, answer in running:
        if not with_image:
            assert answer["current_image"] is None
        elif answer["state"]["sampling_step"]:  # a preview every step (the test server's setting)
            preview = decode(answer["current_image"])
            assert preview.size == (16, 16) and preview.mode == "RGB"

    after = api.get_progress()
    assert after["progress"] == 0 and after["state"]["job_count"] == 0 and after["current_image"] is None
    assert after["eta_relative"] == 0 and after["state"]["job"] == ""


def test_progress_stays_on_the_job_between_iterations(server, rng, idle) -> None:
    """Polled every few ms, an n_iter 3 run never reads as idle (progress 0, job_count 0) between its
    iterations: A1111 clients (webuiapi's util_wait_for_ready) take that for "finished"."""
    session = requests.Session()
    body = {"prompt": PROMPT, **SMALL, "steps": 8, "n_iter": 3, "seed": draw(rng)}
    seen: list[tuple[int, int]] = []
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(server.post, TXT2IMG, json=body)
        while not run.done():
            state = read_progress(session, server.url)["state"]
            seen.append((state["job_count"], state["job_no"]))
            time.sleep(0.003)
        assert run.result().status_code == 200
    running = [i for i, (count, _) in enumerate(seen) if count]
    assert running, "no poll saw the run"
    between = seen[running[0] : running[-1] + 1]
    assert all(count == 3 for count, _ in between), f"idle between iterations: {between}"
    assert [no for _, no in between] == sorted(no for _, no in between) and between[-1][1] == 2


def test_interrupt_answers_with_the_partial_first_iteration(
    server, api: webuiapi.WebUIApi, ref: References, long_run: LongRun, rng, idle
) -> None:
    """The interrupted txt2img answers 200 with the partly denoised image of its first iteration only
    (n_iter 2); a request queued behind it runs untouched."""
    session = requests.Session()
    behind = {"prompt": "a boat", **SMALL, "seed": draw(rng)}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(server.post, TXT2IMG, json=long_run.body())
        seen = poll_until(session, server.url, running_first_iteration(2))["state"]["sampling_step"]
        queued = pool.submit(server.post, TXT2IMG, json=behind)
        deadline = time.monotonic() + 30
        while server.state.scheduler.queued_jobs() < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert api.interrupt() == {"interrupted": 1}
        first, second = running.result(), queued.result()
    images = response_images(first)
    assert len(images) == 1, "n_iter 2 interrupted in its first iteration: that iteration's image only"
    info = info_of(first)
    assert info["interrupted"] is True and info["all_seeds"] == [long_run.seed]
    step = long_run.stopped_at(images[0], seen)
    assert step is not None and step < 30, "not the partly denoised image of the first iteration"
    assert images[0].info["parameters"] == info["infotexts"][0]
    assert_same_images(response_images(second), ref.images("a boat", **settings_of(behind)))
    assert info_of(second)["interrupted"] is False


@pytest.mark.parametrize("signal", ["interrupt", "skip"])
def test_signal_while_idle_is_forgotten(server, ref: References, rng, signal: str, idle) -> None:
    """An interrupt or skip sent with nothing running does not cancel the next request."""
    answer = server.post(f"{API}/{signal}")
    assert answer.status_code == 200
    body = {"prompt": PROMPT, **SMALL, "seed": draw(rng), "n_iter": 2}
    response = server.post(TXT2IMG, json=body)
    seed = body["seed"]
    settings = settings_of({**SMALL})
    assert_same_images(
        response_images(response), [ref.solo(seed, **settings), ref.solo(seed + 1, **settings)]
    )
    assert info_of(response)["interrupted"] is False


def test_skip_returns_the_partial_chunk_and_runs_the_next_iteration(
    server, api: webuiapi.WebUIApi, long_run: LongRun, idle
) -> None:
    session = requests.Session()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(server.post, TXT2IMG, json=long_run.body())
        seen = poll_until(session, server.url, running_first_iteration(2))["state"]["sampling_step"]
        assert api.skip() == {"skipped": 1}
        response = running.result()
    images = response_images(response)
    assert len(images) == 2, "the skipped iteration's image, then the next iteration's"
    step = long_run.stopped_at(images[0], seen)
    assert step is not None and step < 30, "the skipped chunk's image is not its partly denoised image"
    assert_same_images(images[1:], long_run.full[1:])
    assert info_of(response)["all_seeds"] == [long_run.seed, long_run.seed + 1]


# -- replays: sampler names --------------------------------------------------------------------------

SAMPLER_CASES = {
    "sampler_index-alone": ({"sampler_index": "DPM++ 2M"}, "DPM++ 2M"),
    "sampler_name-alone": ({"sampler_name": "DPM++ 2M"}, "DPM++ 2M"),
    "both-sampler_name-wins": ({"sampler_name": "DPM++ 2M", "sampler_index": "Euler"}, "DPM++ 2M"),
    "alias-k_euler_a": ({"sampler_name": "k_euler_a"}, "Euler a"),
    "alias-as-sampler_index": ({"sampler_index": "k_dpmpp_2m"}, "DPM++ 2M"),
    "combined-DPM++-2M-Karras": ({"sampler_name": "DPM++ 2M Karras"}, "DPM++ 2M Karras"),
    "split-DPM++-2M+Karras": ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, "DPM++ 2M Karras"),
    "split-lower-case-karras": ({"sampler_name": "DPM++ 2M", "scheduler": "karras"}, "DPM++ 2M Karras"),
    "neither-A1111-default": ({}, "Euler"),
}


@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_sampler_names(server, ref: References, rng, case: str) -> None:
    fields, sampler = SAMPLER_CASES[case]
    body = {"prompt": PROMPT, **{k: v for k, v in SMALL.items() if k != "sampler_name"}, "seed": draw(rng)}
    response = server.post(TXT2IMG, json={**body, **fields})
    assert_same_images(response_images(response), ref.images(**{**settings_of(body), "sampler": sampler}))
    assert info_of(response)["sampler_name"] == sampler


def test_the_alias_is_listed_and_karras_changes_the_image(server, ref: References, rng) -> None:
    listed = {alias for entry in server.get(f"{API}/samplers").json() for alias in entry["aliases"]}
    assert {"k_euler_a", "k_dpmpp_2m"} <= listed
    settings = settings_of({**SMALL, "seed": draw(rng)})
    plain = ref.images(**{**settings, "sampler": "DPM++ 2M"})[0]
    karras = ref.images(**{**settings, "sampler": "DPM++ 2M Karras"})[0]
    assert not np.array_equal(plain, karras)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"sampler_name": "Euler b"}, ("sampler_name", "Euler b")),
        ({"sampler_index": "Euler b"}, ("sampler_index", "Euler b")),
        ({"sampler_name": "DPM++ 2M", "scheduler": "Karras2"}, ("scheduler", "Karras2")),
        ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Exponential"}, ("scheduler",)),
    ],
    ids=["unknown-name", "unknown-index", "unknown-scheduler", "combined-contradicts-scheduler"],
)
def test_unknown_sampler_is_an_error_naming_it(
    server, fields: dict[str, Any], named: tuple[str, ...]
) -> None:
    body = {"prompt": PROMPT, **{k: v for k, v in SMALL.items() if k != "sampler_name"}, **fields}
    assert_error(server.post(TXT2IMG, json=body), (404, 422), *named)


# -- replays: null, coercion, init images, scripts, unsupported features ------------------------------

NULL_CHANGES = {  # a null field -> what the reference uses instead of the base body's value
    "negative_prompt": {"negative_prompt": ""},
    "sampler_name": {"sampler": A1111_SAMPLER},
    "steps": {"steps": A1111_STEPS},
    "cfg_scale": {"guidance_scale": A1111_CFG},
    "seed": {},  # random: the reference uses the recorded seed
}
NULL_HARMLESS = [  # nulls that leave the base body's image as it is
    "sampler_index", "scheduler", "batch_size", "n_iter", "styles", "subseed", "subseed_strength",
    "seed_resize_from_h", "seed_resize_from_w", "restore_faces", "tiling", "eta", "s_churn", "s_tmin",
    "s_tmax", "s_noise", "s_min_uncond", "override_settings", "override_settings_restore_afterwards",
    "script_name", "script_args", "alwayson_scripts", "send_images", "save_images", "enable_hr",
    "denoising_strength", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_sampler_name",
    "hr_prompt", "refiner_checkpoint", "comments", "infotext", "do_not_save_samples",
]  # fmt: skip


@pytest.mark.parametrize("name", [*NULL_CHANGES, "every-other-optional-field"])
def test_null_means_the_default(server, ref: References, rng, name: str) -> None:
    base = {"prompt": PROMPT, "negative_prompt": "fog", **SMALL, "steps": 3, "seed": draw(rng)}
    nulls = dict.fromkeys(NULL_HARMLESS if name not in NULL_CHANGES else [name])
    response = server.post(TXT2IMG, json={**base, **nulls})
    images = response_images(response)
    settings = {**settings_of(base), **NULL_CHANGES.get(name, {})}
    negative = settings.pop("negative_prompt", "fog")
    if name == "seed":
        settings["seed"] = info_of(response)["seed"]
    assert_same_images(images, ref.images(PROMPT, negative, **settings))


def test_null_img2img_fields_mean_the_default(server, ref: References, rng) -> None:
    seed, init = draw(rng), random_image(rng, 64, 64)
    nulls = dict.fromkeys(["resize_mode", "denoising_strength", "mask", "mask_blur", "image_cfg_scale",
                           "initial_noise_multiplier", "include_init_images", "inpainting_fill"])  # fmt: skip
    body = {"prompt": PROMPT, **SMALL, "seed": seed, "init_images": [b64_png(init)], **nulls}
    expected = ref.images(image=init, strength=0.75, **settings_of({**SMALL, "seed": seed}))
    assert_same_images(response_images(server.post(IMG2IMG, json=body)), expected)


def test_numeric_strings_coerce(server, ref: References, rng) -> None:
    seed = draw(rng)
    body = {"prompt": PROMPT, "width": "64", "height": "64", "steps": "4", "cfg_scale": "6.5",
            "seed": str(seed), "batch_size": "2", "n_iter": "1", "sampler_name": "Euler a"}  # fmt: skip
    settings = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 6.5, "seed": seed, "batch_size": 2}
    expected = ref.images(sampler="Euler a", **settings)
    assert_same_images(response_images(server.post(TXT2IMG, json=body)), expected)
    init = random_image(rng, 64, 64)
    body = {**body, "init_images": [b64_png(init)], "denoising_strength": "0.5", "resize_mode": "0"}
    expected = ref.images(sampler="Euler a", image=init, strength=0.5, **settings)
    assert_same_images(response_images(server.post(IMG2IMG, json=body)), expected)


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"], ids=["bare", "data-url"])
def test_init_image_base64_with_or_without_a_data_url_prefix(
    server, ref: References, rng, prefix: str
) -> None:
    seed, init = draw(rng), random_image(rng, 64, 64)
    body = {"prompt": PROMPT, **SMALL, "seed": seed, "init_images": [prefix + b64_png(init)]}
    expected = ref.images(image=init, strength=0.75, **settings_of({**SMALL, "seed": seed}))
    assert_same_images(response_images(server.post(IMG2IMG, json=body)), expected)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port on 127.0.0.1 nobody should connect to: the server must not fetch init image URLs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/init.png",
        "https://127.0.0.1:{port}/init.png",
        "//127.0.0.1:{port}/init.png",
        "file:///etc/passwd",
        "ftp://127.0.0.1:{port}/init.png",
    ],
    ids=["http", "https", "scheme-relative", "file", "ftp"],
)
def test_init_image_urls_are_refused_and_not_fetched(server, listener: socket.socket, template: str) -> None:
    url = template.format(port=listener.getsockname()[1])
    body = {"prompt": PROMPT, **SMALL, "init_images": [url]}
    assert_error(server.post(IMG2IMG, json=body), (400, 422), "init_images")
    time.sleep(0.05)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected


@pytest.mark.parametrize("init_images", [[], None, "missing"], ids=["empty", "null", "missing"])
def test_img2img_without_an_init_image_is_422(server, init_images: Any) -> None:
    body = {"prompt": PROMPT, **SMALL}
    if init_images != "missing":
        body["init_images"] = init_images
    assert_error(server.post(IMG2IMG, json=body), 422, "init_images")


def test_scripts_lists_only_what_is_supported(server, api: webuiapi.WebUIApi) -> None:
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert not (api.has_controlnet or api.has_adetailer or api.has_animatediff)
    assert server.get(f"{API}/extensions").json() == []


@pytest.mark.parametrize("route", [TXT2IMG, IMG2IMG])
@pytest.mark.parametrize("script", ["ControlNet", "ADetailer", "Self Attention Guidance"])
def test_alwayson_script_the_server_lacks_is_422(server, rng, route: str, script: str) -> None:
    body = {"prompt": PROMPT, **SMALL, "alwayson_scripts": {script: {"args": []}}}
    if route == IMG2IMG:
        body["init_images"] = [b64_png(random_image(rng, 64, 64))]
    assert_error(server.post(route, json=body), 422, "alwayson_scripts", script)


UNSUPPORTED = {
    "enable_hr": (TXT2IMG, True),
    "restore_faces": (TXT2IMG, True),
    "tiling": (TXT2IMG, True),
    "styles": (TXT2IMG, ["cinematic"]),
    "subseed_strength": (TXT2IMG, 0.4),
    "script_name": (TXT2IMG, "x/y/z plot"),
    "mask": (IMG2IMG, "mask"),
    "resize_mode": (IMG2IMG, 3),
    "img2img-restore_faces": (IMG2IMG, True),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_feature_is_422_naming_the_field(server, rng, case: str) -> None:
    route, value = UNSUPPORTED[case]
    name = case.removeprefix("img2img-")
    body = {"prompt": PROMPT, **SMALL}
    if route == IMG2IMG:
        body["init_images"] = [b64_png(random_image(rng, 64, 64))]
        value = body["init_images"][0] if value == "mask" else value
    answer = assert_error(server.post(route, json={**body, name: value}), 422, name)
    assert answer.get("field") == name


def test_unknown_fields_are_ignored(server, ref: References, rng) -> None:
    seed = draw(rng)
    body = {"prompt": PROMPT, **SMALL, "seed": seed, "no_such_field": 1, "force_task_id": "abc",
            "hr_additional_modules": ["Use same choices"], "extra": {"nested": [1, 2]}}  # fmt: skip
    response = server.post(TXT2IMG, json=body)
    assert_same_images(response_images(response), ref.images(**settings_of(body)))


# -- replays: batches, seeds, override_settings -----------------------------------------------------


@pytest.mark.parametrize(("batch_size", "n_iter"), [(6, 1), (3, 2), (2, 3)])
def test_batches_split_and_seeds_consecutive(
    server, ref: References, rng, batch_size: int, n_iter: int
) -> None:
    """batch_size 6 is split past the server's micro-batch (4); n_iter x batch_size images take consecutive
    seeds; image i equals the image seed + i gives alone."""
    seed = draw(rng)
    body = {"prompt": PROMPT, **SMALL, "seed": seed, "batch_size": batch_size, "n_iter": n_iter}
    response = server.post(TXT2IMG, json=body)
    solo = settings_of(SMALL)
    assert_same_images(response_images(response), [ref.solo(seed + i, **solo) for i in range(6)])
    info = info_of(response)
    assert info["seed"] == seed and info["all_seeds"] == list(range(seed, seed + 6))
    assert [f"Seed: {seed + i}," in text for i, text in enumerate(info["infotexts"])] == [True] * 6
    positions = [text.split("Batch pos: ")[1].split(",")[0] for text in info["infotexts"]]
    assert positions == [str(i % batch_size) for i in range(6)]


@pytest.mark.parametrize("seed", [-1, None, "omitted"])
def test_random_seed_is_recorded(server, ref: References, seed: Any) -> None:
    body = {"prompt": PROMPT, **SMALL, "batch_size": 2}
    if seed != "omitted":
        body["seed"] = seed
    answers = [server.post(TXT2IMG, json=body) for _ in range(2)]
    seeds = [info_of(answer)["seed"] for answer in answers]
    assert seeds[0] != seeds[1] and all(0 <= s < 2**32 for s in seeds)
    for answer, first in zip(answers, seeds, strict=True):
        info = info_of(answer)
        assert info["all_seeds"] == [first, first + 1]
        assert f"Seed: {first}," in decode(answer.json()["images"][0]).info["parameters"]
        assert_same_images(
            response_images(answer), ref.images(**settings_of({**SMALL, "seed": first, "batch_size": 2}))
        )


def test_override_settings_clip_skip_for_one_request(server, ref: References, rng) -> None:
    seed = draw(rng)
    body = {"prompt": PROMPT, **SMALL, "seed": seed, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    response = server.post(TXT2IMG, json=body)
    assert_same_images(response_images(response), ref.images(clip_skip=2, **settings_of(body)))
    assert info_of(response)["clip_skip"] == 2
    assert server.get(f"{API}/options").json()["CLIP_stop_at_last_layers"] == 1
    nulled = {**body, "override_settings": {"CLIP_stop_at_last_layers": None, "sd_model_checkpoint": None}}
    assert_same_images(response_images(server.post(TXT2IMG, json=nulled)), ref.images(**settings_of(body)))


def test_override_settings_with_a_served_or_unknown_model(server, ref: References, rng) -> None:
    model = server.get(f"{API}/sd-models").json()[0]
    seed = draw(rng)
    for name in (model["title"], model["model_name"], model["hash"]):
        body = {"prompt": PROMPT, **SMALL, "seed": seed, "override_settings": {"sd_model_checkpoint": name}}
        assert_same_images(response_images(server.post(TXT2IMG, json=body)), ref.images(**settings_of(body)))
    body = {"prompt": PROMPT, **SMALL, "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}
    assert_error(server.post(TXT2IMG, json=body), 404, "sd_model_checkpoint", "../../etc/passwd")


@pytest.mark.parametrize(
    ("route", "extra", "field"),
    [
        ("img2img", {"init_images": ["IMAGE", "IMAGE"]}, "init_images"),
        ("txt2img", {"override_settings": {"eta_noise_seed_delta": 31337}}, "eta_noise_seed_delta"),
        ("txt2img", {"override_settings": {"sd_vae": "other.safetensors"}}, "sd_vae"),
        ("txt2img", {"override_settings": {"samples_format": "jpg"}}, "samples_format"),
    ],
)
def test_what_would_change_the_images_unseen_is_a_422(server, route: str, extra: dict, field: str) -> None:
    """Settings A1111 honours and this engine cannot: refused naming them, never silently ignored."""
    image = b64_png(Image.new("RGB", (64, 64), (90, 120, 200)))
    extra = {
        k: [image if v == "IMAGE" else v for v in vs] if k == "init_images" else vs for k, vs in extra.items()
    }
    answer = server.post(f"{API}/{route}", json={"prompt": PROMPT, **SMALL, **extra})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and field in answer.json()["detail"]


@pytest.mark.parametrize(("option", "value"), [("eta_noise_seed_delta", 31337), ("samples_format", "webp")])
def test_options_the_engine_cannot_honour_are_refused(server, option: str, value: Any) -> None:
    answer = server.post(f"{API}/options", json={option: value})
    assert answer.status_code == 422 and answer.json()["field"] == option, answer.text
    assert server.get(f"{API}/options").json()[option] != value
