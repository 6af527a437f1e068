"""The OpenAI Images routes with the real ``openai`` SDK (unmodified) against a live server on the tiny
engine: images equal to ``Pipeline.generate`` with the route's documented defaults, OpenAI's error shape, the
model aliases clients hard-code, the SDK's multipart edits, and 429 with a Retry-After the SDK honours."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from engine.service.openai_images import DEFAULT_CFG, DEFAULT_EDIT_STRENGTH, DEFAULT_SAMPLER
from engine.service.scheduler import MAX_RETRY_AFTER_S, Scheduler

if TYPE_CHECKING:
    from tests.service.conftest import LiveServer

STEPS = 4
SIZE = 64
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def pipe(tiny_engine: Path) -> Any:
    """The reference: the same engine folder loaded outside the server."""
    from engine import Pipeline

    return Pipeline.load(tiny_engine)


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(pipe: Any, prompt: str, seed: int, n: int = 1, **settings: Any) -> list[np.ndarray]:
    """``Pipeline.generate`` with the OpenAI route's defaults (guidance, sampler) at the tests' size."""
    result = pipe.generate(
        prompt,
        seed=seed,
        batch_size=n,
        steps=STEPS,
        guidance_scale=DEFAULT_CFG,
        sampler=DEFAULT_SAMPLER,
        width=SIZE,
        height=SIZE,
        **settings,
    )
    assert result.seeds == [seed + i for i in range(n)]
    return [np.asarray(image.convert("RGB")) for image in result.images]


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "RGB")


def draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31))


def assert_error(body: Any, param: str | None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: exactly message, type, param and code; a one-line message."""
    error = body.get("error", body)  # the SDK's exception.body is the inner object
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def small(extra: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A generation body at the tests' size and steps."""
    return {"prompt": "a lighthouse", "size": f"{SIZE}x{SIZE}", "steps": 2, **fields, **(extra or {})}


# -- generations -------------------------------------------------------------------------------------


def test_generate_n2_equals_pipeline(client: openai.OpenAI, pipe: Any, rng: np.random.Generator) -> None:
    seed = draw_seed(rng)
    prompt = "a red fox in the snow"
    response = client.images.generate(
        prompt=prompt, n=2, size=f"{SIZE}x{SIZE}", extra_body={"steps": STEPS, "seed": seed}
    )
    assert len(response.data) == 2
    expected = reference(pipe, prompt, seed, n=2)
    for i, item in enumerate(response.data):
        assert item.url is None
        assert item.model_extra["seed"] == seed + i
        got = pixels(item.b64_json)
        assert got.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(got, expected[i])


def test_models_list_names_the_served_engine(client: openai.OpenAI, tiny_engine: Path) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [tiny_engine.resolve().name]
    assert models.data[0].object == "model"


@pytest.mark.parametrize("alias", ["dall-e-2", "dall-e-3", "gpt-image-1"])
def test_hard_coded_model_names_mean_the_default_engine(
    server: LiveServer, tiny_engine: Path, alias: str, rng: np.random.Generator
) -> None:
    seed = draw_seed(rng)
    plain = server.post("/v1/images/generations", json=small(seed=seed))
    named = server.post("/v1/images/generations", json=small(seed=seed, model=tiny_engine.resolve().name))
    aliased = server.post("/v1/images/generations", json=small(seed=seed, model=alias))
    assert plain.status_code == named.status_code == aliased.status_code == 200, aliased.text
    expected = pixels(plain.json()["data"][0]["b64_json"])
    np.testing.assert_array_equal(pixels(aliased.json()["data"][0]["b64_json"]), expected)
    np.testing.assert_array_equal(pixels(named.json()["data"][0]["b64_json"]), expected)


def test_optional_and_unknown_fields_change_nothing(
    client: openai.OpenAI, server: LiveServer, rng: np.random.Generator
) -> None:
    """quality / style / user accepted, unknown fields ignored, response_format a plain string."""
    seed = draw_seed(rng)
    plain = server.post("/v1/images/generations", json=small(seed=seed))
    assert plain.status_code == 200, plain.text
    expected = pixels(plain.json()["data"][0]["b64_json"])
    extras = {
        "response_format": "b64_json",
        "quality": "hd",
        "style": "vivid",
        "user": "user-1234",
        "moderation": "low",
        "no_such_field": {"nested": [1, 2]},
        "negative_prompt": None,
    }
    loaded = server.post("/v1/images/generations", json=small(extras, seed=seed))
    assert loaded.status_code == 200, loaded.text
    np.testing.assert_array_equal(pixels(loaded.json()["data"][0]["b64_json"]), expected)
    by_sdk = client.images.generate(
        prompt="a lighthouse",
        size=f"{SIZE}x{SIZE}",
        response_format="b64_json",
        quality="standard",
        style="natural",
        user="someone",
        extra_body={"steps": 2, "seed": seed, "unknown": True},
    )
    np.testing.assert_array_equal(pixels(by_sdk.data[0].b64_json), expected)


def test_url_response_format_is_a_400(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="x", size="64x64", response_format="url", extra_body={"steps": 2})
    assert raised.value.status_code == 400
    assert_error(raised.value.body, "response_format")
    answer = server.post("/v1/images/generations", json=small(response_format="url"))
    assert answer.status_code == 400
    assert "b64_json" in assert_error(answer.json(), "response_format")["message"]


@pytest.mark.parametrize("size", ["65x64", "big", "0x64", "4096x4096", "64x", "-64x64", "64x64x64"])
def test_bad_size_is_a_400_naming_size(client: openai.OpenAI, size: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="x", size=size, extra_body={"steps": 2})  # type: ignore[arg-type]
    assert raised.value.status_code == 400
    assert_error(raised.value.body, "size")


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"n": 17}, "n"), ({"n": 0}, "n"), ({"steps": 101}, "steps"), ({"size": "1024x64"}, "size")],
)
def test_limits_are_400s_naming_the_field(server: LiveServer, fields: dict[str, Any], param: str) -> None:
    answer = server.post("/v1/images/generations", json=small(**fields))
    assert answer.status_code == 400, answer.text
    assert_error(answer.json(), param)


@pytest.mark.parametrize("model", ["no-such-model", "../../etc/passwd", "dall-e-4"])
def test_unknown_model_is_a_404_model_not_found(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.images.generate(prompt="x", model=model, size="64x64", extra_body={"steps": 2})
    assert raised.value.status_code == 404
    assert_error(raised.value.body, "model", "model_not_found")


def test_invalid_json_and_types_are_400s_in_openai_shape(server: LiveServer) -> None:
    broken = server.post(
        "/v1/images/generations", data=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    assert_error(broken.json(), "body")
    wrong = server.post("/v1/images/generations", json=small(n="two"))
    assert wrong.status_code == 400
    assert_error(wrong.json(), "n")
    missing = server.post("/v1/images/generations", json={"size": "64x64"})
    assert missing.status_code == 400
    assert_error(missing.json(), "prompt")


# -- edits -------------------------------------------------------------------------------------------


def test_edit_with_one_image_equals_img2img(
    client: openai.OpenAI, pipe: Any, rng: np.random.Generator
) -> None:
    seed = draw_seed(rng)
    start = random_image(rng)
    response = client.images.edit(
        image=("start.png", png_bytes(start), "image/png"),
        prompt="a watercolour",
        size=f"{SIZE}x{SIZE}",
        extra_body={"steps": STEPS, "seed": seed},
    )
    expected = reference(pipe, "a watercolour", seed, image=start, strength=DEFAULT_EDIT_STRENGTH)
    assert len(response.data) == 1
    assert response.data[0].model_extra["seed"] == seed
    np.testing.assert_array_equal(pixels(response.data[0].b64_json), expected[0])


def test_edit_with_a_list_sends_image_brackets(
    client: openai.OpenAI, pipe: Any, rng: np.random.Generator
) -> None:
    seed = draw_seed(rng)
    image = random_image(rng)
    response = client.images.edit(
        image=[("a.png", png_bytes(image), "image/png")],  # a list: the SDK sends the field as image[]
        prompt="a watercolour",
        n=2,
        size=f"{SIZE}x{SIZE}",
        extra_body={"steps": STEPS, "seed": seed},
    )
    expected = reference(pipe, "a watercolour", seed, n=2, image=image, strength=DEFAULT_EDIT_STRENGTH)
    assert [item.model_extra["seed"] for item in response.data] == [seed, seed + 1]
    for item, want in zip(response.data, expected, strict=True):
        np.testing.assert_array_equal(pixels(item.b64_json), want)


def test_edit_with_several_images_is_a_400_naming_image(
    client: openai.OpenAI, rng: np.random.Generator
) -> None:
    files = [(f"{name}.png", png_bytes(random_image(rng)), "image/png") for name in "ab"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(image=files, prompt="x", size="64x64", extra_body={"steps": 2})
    assert_error(raised.value.body, "image")
    assert "one image" in raised.value.body["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"stream": True, "partial_images": 1}, "stream"), ({"background": "transparent"}, "background")],
)
def test_what_the_server_cannot_give_is_a_400_naming_it(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="x", size="64x64", extra_body={"steps": 2, **extra})
    assert_error(raised.value.body, param)


def test_edit_with_a_mask_is_a_400_naming_mask(client: openai.OpenAI, rng: np.random.Generator) -> None:
    image = png_bytes(random_image(rng))
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(
            image=("a.png", image, "image/png"),
            mask=("m.png", image, "image/png"),
            prompt="x",
            size="64x64",
            extra_body={"steps": 2},
        )
    assert_error(raised.value.body, "mask")


@pytest.mark.parametrize(
    "upload",
    [("notes.txt", b"not an image at all", "text/plain"), ("cut.png", b"\x89PNG\r\n\x1a\n\0\0", "image/png")],
)
def test_edit_with_a_non_image_is_a_400_naming_image(client: openai.OpenAI, upload: tuple) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(image=upload, prompt="x", size="64x64", extra_body={"steps": 2})
    assert raised.value.status_code == 400
    assert_error(raised.value.body, "image")


def test_edit_without_an_image_is_a_400_naming_image(server: LiveServer) -> None:
    answer = server.post("/v1/images/edits", data={"prompt": "x", "size": "64x64"}, files={"x": ("x", b"1")})
    assert answer.status_code == 400
    assert_error(answer.json(), "image")
    not_multipart = server.post("/v1/images/edits", json={"prompt": "x", "image": "abc"})
    assert not_multipart.status_code == 400
    assert_error(not_multipart.json(), "image")


# -- Retry-After ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "after", "stop"),
    [
        (0.2, "1", False),
        (1.0, "1", False),
        (7.3, "8", False),
        (60.0, "60", False),
        (60.5, "60", True),
        (3600.0, "60", True),
    ],
)
def test_retry_after_is_capped_at_60_and_longer_waits_say_do_not_retry(
    seconds: float, after: str, stop: bool
) -> None:
    headers = Scheduler.retry_after_headers(seconds)
    assert headers["Retry-After"] == after
    assert ("x-should-retry" in headers) is stop
    if stop:
        assert headers["x-should-retry"] == "false"


def in_background(server: LiveServer, body: dict[str, Any]) -> tuple[threading.Thread, list]:
    answers: list[requests.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(server.post("/v1/images/generations", json=body)), daemon=True
    )
    thread.start()
    return thread, answers


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@pytest.fixture
def full_queue(make_server: Callable[..., LiveServer]) -> Iterator[LiveServer]:
    """A server with one long request running and one waiting in a queue of one."""
    live = make_server(max_queue=1, max_batch=1)
    scheduler = live.state.scheduler
    long_run = small(size="256x256", steps=40)
    running, first = in_background(live, long_run)
    wait_for(lambda: scheduler.busy() and scheduler.queued_jobs() == 0, "the long request runs")
    waiting, second = in_background(live, small())
    wait_for(lambda: scheduler.queued_jobs() == 1, "the second request waits")
    yield live
    live.post("/sdapi/v1/interrupt")  # the long request answers with what it has
    running.join(timeout=120)
    waiting.join(timeout=120)
    assert [a.status_code for a in first + second] == [200, 200]


def test_full_queue_answers_429_with_retry_after(full_queue: LiveServer) -> None:
    answer = full_queue.post("/v1/images/generations", json=small())
    assert answer.status_code == 429
    error = assert_error(answer.json(), None, "queue_full")
    assert "queue" in error["message"]
    retry_after = answer.headers["Retry-After"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= MAX_RETRY_AFTER_S
    if answer.headers.get("x-should-retry") is not None:
        assert answer.headers["x-should-retry"] == "false"
    client = openai.OpenAI(base_url=full_queue.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        client.images.generate(prompt="x", size="64x64", extra_body={"steps": 2})
    assert raised.value.status_code == 429
    assert_error(raised.value.body, None, "queue_full")
    assert raised.value.response.headers["retry-after"].isdigit()
