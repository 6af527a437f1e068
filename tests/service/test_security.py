"""Security and limits of a live server: the API key (Bearer) and A1111's --api-auth (Basic) on every route
kind, keys kept out of the logs, body / image / request limits as 4xx JSON naming the field, model names
that never reach the file system, and CORS off unless configured. Real clients (requests, openai,
webuiapi) against uvicorn on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openai
import pytest
import requests
import webuiapi
from PIL import Image

if TYPE_CHECKING:
    from tests.service.conftest import LiveServer

KEY = "k1"
TXT2IMG = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}
OPENAI_GEN = {"prompt": "a fox", "size": "64x64", "steps": 2}
EDIT_FIELDS = {"prompt": "a fox", "size": "64x64", "steps": "2"}
# (method, path, JSON body or None): every kind of route, plus paths and methods the app does not serve.
ROUTES = [
    ("GET", "/sdapi/v1/sd-models", None),
    ("GET", "/sdapi/v1/samplers", None),
    ("GET", "/sdapi/v1/progress", None),
    ("GET", "/sdapi/v1/options", None),
    ("POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2}),
    ("POST", "/sdapi/v1/txt2img", TXT2IMG),
    ("POST", "/sdapi/v1/img2img", {**TXT2IMG, "init_images": []}),
    ("POST", "/sdapi/v1/interrupt", None),
    ("POST", "/sdapi/v1/png-info", {"image": ""}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/images/generations", OPENAI_GEN),
    ("POST", "/v1/images/edits", None),
    ("GET", "/metrics", None),
    ("GET", "/no/such/path", None),
    ("GET", "/sdapi/v1/no-such-route", None),
    ("POST", "/v1/no-such-route", {}),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/health", None),
    ("GET", "/sdapi/v1/txt2img", None),  # wrong methods
    ("DELETE", "/v1/models", None),
    ("PUT", "/sdapi/v1/options", {}),
    ("PATCH", "/v1/images/generations", {}),
    ("HEAD", "/sdapi/v1/sd-models", None),
    ("OPTIONS", "/sdapi/v1/txt2img", None),
]


def call(server: LiveServer, method: str, path: str, body: Any, headers: dict[str, str]) -> requests.Response:
    return requests.request(method, server.url + path, json=body, headers=headers, timeout=60)


def raw_status(server: LiveServer, path: str, headers: dict[str, str]) -> int:
    """GET ``path`` exactly as written (requests and urllib3 fold ``..`` segments before sending)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64png(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def assert_401(answer: requests.Response, path: str) -> None:
    assert answer.status_code == 401, (path, answer.status_code, answer.text[:200])
    assert "Bearer" in answer.headers["WWW-Authenticate"]
    if answer.request.method == "HEAD":
        return
    body = answer.json()
    if path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "invalid_api_key"
    else:
        assert "authentication" in body["detail"]


def field_of(answer: requests.Response) -> str | None:
    """The field a 4xx names: OpenAI's ``param`` under /v1, the A1111 error's ``field`` elsewhere."""
    body = answer.json()
    return body["error"]["param"] if isinstance(body.get("error"), dict) else body.get("field")


@pytest.fixture(scope="module")
def keyed(tiny_engine: Path) -> Iterator[LiveServer]:
    from tests.service.conftest import live_server, tiny_config

    with live_server(tiny_config(tiny_engine, api_key=KEY)) as live:
        yield live


# -- API key -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "credentials",
    [
        None,
        "Bearer wrong",
        "Bearer " + KEY + "x",
        "Bearer " + KEY.upper(),
        "Bearer ",
        KEY,
        "Token " + KEY,
        basic(KEY, ""),
        basic("user", KEY),
    ],
    ids=["none", "wrong", "longer", "case", "empty", "no-scheme", "other-scheme", "basic-key", "basic-pw"],
)
def test_every_route_kind_is_401_without_the_key(keyed: LiveServer, credentials: str | None) -> None:
    headers = {} if credentials is None else {"Authorization": credentials}
    for method, path, body in ROUTES:
        assert_401(call(keyed, method, path, body, headers), path)
    in_query = keyed.get("/v1/models", params={"api_key": KEY, "key": KEY})
    assert_401(in_query, "/v1/models")


@pytest.mark.parametrize(
    "path",
    [
        "/health/live/../../sdapi/v1/sd-models",
        "/health/ready/../../v1/models",
        "/health/live%2F..%2F..%2Fv1%2Fmodels",
        "//health/live",
        "/health/live/",
        "/HEALTH/LIVE",
        "/health/live;/../../v1/models",
    ],
)
def test_no_path_spelling_gets_past_the_key(keyed: LiveServer, path: str) -> None:
    assert raw_status(keyed, path, {}) == 401
    assert raw_status(keyed, path, {"Authorization": f"Bearer {KEY}"}) != 401


def test_health_needs_no_key(keyed: LiveServer) -> None:
    assert keyed.get("/health/live").status_code == 200
    assert keyed.get("/health/ready").status_code == 200
    assert keyed.get("/health/ready", headers={"Authorization": "Bearer wrong"}).status_code == 200


def test_the_right_key_works_with_the_clients(keyed: LiveServer, tiny_engine: Path) -> None:
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [tiny_engine.resolve().name]
    made = client.images.generate(prompt="a fox", size="64x64", extra_body={"steps": 2, "seed": 1})
    assert len(made.data) == 1 and made.data[0].b64_json
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert keyed.get("/sdapi/v1/sd-models", headers=bearer).status_code == 200
    assert keyed.post("/sdapi/v1/txt2img", json=TXT2IMG, headers=bearer).status_code == 200
    assert keyed.get("/metrics", headers=bearer).status_code == 200
    unknown = keyed.get("/no/such/path", headers=bearer)
    assert unknown.status_code == 404  # with the key, the truth
    wrong = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.models.list()
    assert raised.value.body["code"] == "invalid_api_key"


# -- A1111 --api-auth -----------------------------------------------------------------------------


def test_basic_auth_with_webuiapi(make_server: Callable[..., LiveServer]) -> None:
    live = make_server(api_auth=(("u", "p"), ("other", "s3cret:with:colons")))
    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, username="u", password="p")
    assert [m["model_name"] for m in api.get_sd_models()]
    result = api.txt2img(prompt="a fox", width=64, height=64, steps=2, seed=3)
    assert result.image.size == (64, 64)
    colons = webuiapi.WebUIApi(
        host="127.0.0.1", port=live.port, username="other", password="s3cret:with:colons"
    )
    assert colons.get_options()["sd_model_checkpoint"]
    for user, password in [("u", "wrong"), ("U", "p"), ("other", "p"), ("u", "")]:
        refused = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, username=user, password=password)
        with pytest.raises(RuntimeError) as raised:
            refused.txt2img(prompt="a fox", width=64, height=64, steps=2)
        assert raised.value.args[0] == 401
    anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=live.port)
    assert "authentication" in anonymous.get_sd_models()["detail"]
    assert live.get("/v1/models", headers={"Authorization": "Bearer p"}).status_code == 401
    assert live.get("/health/ready").status_code == 200


# -- logs ----------------------------------------------------------------------------------------------

SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "sd-engine.serve", "")


@pytest.fixture
def server_logs(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], pytest.LogCaptureFixture]]:
    """Call it once the server runs (uvicorn sets its loggers' levels when it starts): every server logger
    at DEBUG into caplog (uvicorn's access log does not propagate to the root); restored afterwards."""
    saved: list[tuple[logging.Logger, int]] = []

    def listen() -> pytest.LogCaptureFixture:
        for name in SERVER_LOGGERS:
            logger = logging.getLogger(name)
            saved.append((logger, logger.level))
            logger.setLevel(logging.DEBUG)
            if not logger.propagate:
                logger.addHandler(caplog.handler)
        caplog.handler.setLevel(logging.DEBUG)
        return caplog

    yield listen
    for logger, level in saved:
        logger.setLevel(level)
        if caplog.handler in logger.handlers:
            logger.removeHandler(caplog.handler)


def test_keys_never_reach_the_logs(
    make_server: Callable[..., LiveServer], server_logs: Callable[[], pytest.LogCaptureFixture]
) -> None:
    key = "sk-" + secrets.token_hex(16)
    wrong = "sk-" + secrets.token_hex(16)
    password = "pw-" + secrets.token_hex(8)
    live = make_server(api_key=key, api_auth=(("user", password),))
    assert key not in repr(live.state.config) and password not in repr(live.state.config)
    logs = server_logs()
    good = {"Authorization": f"Bearer {key}"}
    assert live.get("/v1/models", headers=good).status_code == 200  # passing
    assert live.post("/sdapi/v1/txt2img", json=TXT2IMG, headers=good).status_code == 200
    by_password = {"Authorization": basic("user", password)}
    assert live.get("/sdapi/v1/sd-models", headers=by_password).status_code == 200
    assert live.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401  # failing
    assert live.get("/v1/models", headers={"Authorization": basic("user", wrong)}).status_code == 401
    assert live.post("/v1/images/generations", data=b"{", headers=good).status_code == 400
    assert live.post("/v1/no-route", json={}, headers=good).status_code == 404
    server = [r for r in logs.records if not r.name.startswith(("urllib3", "requests", "openai", "httpx"))]
    lines = [r.getMessage() + (r.exc_text or "") + repr(r.args) for r in server]
    assert any("/v1/models" in line for line in lines), "the access log was not captured"
    for secret in (key, wrong, password, base64.b64encode(f"user:{password}".encode()).decode()):
        assert not [line for line in lines if secret in line]


# -- limits -------------------------------------------------------------------------------------------

BODY_LIMIT = 256 * 1024
IMAGE_PIXELS = 96 * 96
IMAGE_BYTES = 8 * 1024


@pytest.fixture(scope="module")
def limited(tiny_engine: Path) -> Iterator[LiveServer]:
    from tests.service.conftest import live_server, tiny_config

    base = tiny_config(tiny_engine)
    limits = replace(base.limits, body_bytes=BODY_LIMIT, image_pixels=IMAGE_PIXELS, image_bytes=IMAGE_BYTES)
    with live_server(replace(base, limits=limits)) as live:
        yield live


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/v1/images/generations", "/sdapi/v1/img2img"])
def test_a_body_over_the_limit_is_413_json(limited: LiveServer, path: str) -> None:
    base = OPENAI_GEN if path.startswith("/v1/") else TXT2IMG
    body = json.dumps({**base, "prompt": "x" * (BODY_LIMIT + 1)}).encode()
    sized = limited.post(path, data=body, headers={"Content-Type": "application/json"})
    assert sized.status_code == 413 and field_of(sized) == "body", sized.text[:200]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 16 * 1024):
            yield body[start : start + 16 * 1024]

    chunked = limited.post(path, data=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.request.headers.get("Transfer-Encoding") == "chunked"
    assert chunked.status_code == 413 and field_of(chunked) == "body", chunked.text[:200]
    assert limited.post(path.replace("img2img", "txt2img"), json=base).status_code == 200  # still serving


def test_a_multipart_edit_over_the_body_limit_is_413(limited: LiveServer) -> None:
    files = {"image": ("big.png", os.urandom(BODY_LIMIT + 1), "image/png")}
    answer = limited.post("/v1/images/edits", data={"prompt": "x", "size": "64x64"}, files=files)
    assert answer.status_code == 413 and field_of(answer) == "body", answer.text[:200]


def decompression_bomb() -> Image.Image:
    """4000 x 4000 pixels in about 2 KB of PNG: the header's size must be refused before decoding."""
    return Image.new("1", (4000, 4000), 0)


def test_an_image_over_the_pixel_limit_names_its_field(limited: LiveServer) -> None:
    for image in (Image.new("RGB", (128, 128), (9, 9, 9)), decompression_bomb()):
        assert len(png(image)) < IMAGE_BYTES and image.width * image.height > IMAGE_PIXELS
        a1111 = limited.post("/sdapi/v1/img2img", json={**TXT2IMG, "init_images": [b64png(image)]})
        assert 400 <= a1111.status_code < 500 and field_of(a1111) == "init_images", a1111.text[:200]
        files = {"image": ("big.png", png(image), "image/png")}
        edit = limited.post("/v1/images/edits", data=EDIT_FIELDS, files=files)
        assert 400 <= edit.status_code < 500 and field_of(edit) == "image", edit.text[:200]
        assert "pixel" in edit.json()["error"]["message"]


def test_an_image_over_the_byte_limit_names_its_field(limited: LiveServer, rng: np.random.Generator) -> None:
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")  # ~12 KB of PNG
    assert len(png(noise)) > IMAGE_BYTES
    a1111 = limited.post("/sdapi/v1/img2img", json={**TXT2IMG, "init_images": [b64png(noise)]})
    assert 400 <= a1111.status_code < 500 and field_of(a1111) == "init_images", a1111.text[:200]
    files = {"image": ("noise.png", png(noise), "image/png")}
    edit = limited.post("/v1/images/edits", data=EDIT_FIELDS, files=files)
    assert 400 <= edit.status_code < 500 and field_of(edit) == "image", edit.text[:200]


@pytest.mark.parametrize(
    ("path", "changes", "field", "limit"),
    [
        ("/sdapi/v1/txt2img", {"steps": 101}, "steps", "100"),
        ("/sdapi/v1/txt2img", {"width": 520}, "width", "512"),
        ("/sdapi/v1/txt2img", {"height": 1024}, "height", "512"),
        ("/sdapi/v1/txt2img", {"batch_size": 17}, "batch_size", "16"),
        ("/sdapi/v1/txt2img", {"batch_size": 4, "n_iter": 5}, "batch_size|n_iter", "16"),
        ("/v1/images/generations", {"steps": 101}, "steps", "100"),
        ("/v1/images/generations", {"size": "64x1024"}, "size", "512"),
        ("/v1/images/generations", {"n": 17}, "n", "16"),
    ],
)
def test_requests_beyond_the_limits_name_the_field(
    server: LiveServer, path: str, changes: dict[str, Any], field: str, limit: str
) -> None:
    """The shared server's limits: steps <= 100, side <= 512, images <= 16 (tests/service/conftest.py)."""
    base = OPENAI_GEN if path.startswith("/v1/") else TXT2IMG
    answer = server.post(path, json={**base, **changes})
    assert 400 <= answer.status_code < 500 and field_of(answer) in field.split("|"), answer.text[:200]
    assert f"at most {limit}" in answer.text


def test_img2img_beyond_the_step_limit_names_steps(server: LiveServer) -> None:
    image = b64png(Image.new("RGB", (64, 64), (90, 40, 10)))
    answer = server.post("/sdapi/v1/img2img", json={**TXT2IMG, "steps": 1000, "init_images": [image]})
    assert 400 <= answer.status_code < 500 and field_of(answer) == "steps", answer.text[:200]


# -- model names ------------------------------------------------------------------------------------


@pytest.fixture
def opened(tmp_path: Path, tiny_engine: Path) -> Iterator[tuple[Path, list[str]]]:
    """A decoy engine folder (a link to the real one) under a unique name, and every file-system event of
    this process that names it while the test runs (a Python audit hook; it stays installed, inert)."""
    decoy = tmp_path / f"decoy-{secrets.token_hex(6)}"
    decoy.symlink_to(tiny_engine.resolve(), target_is_directory=True)
    seen: list[str] = []
    active = [True]
    watched = ("open", "os.listdir", "os.scandir", "os.chdir", "glob.glob", "pathlib.Path.glob")

    def hook(event: str, args: tuple) -> None:
        if active[0] and event in watched and decoy.name in repr(args):
            seen.append(f"{event} {args!r}")

    sys.addaudithook(hook)
    yield decoy, seen
    active[0] = False


def test_model_names_never_reach_the_file_system(server: LiveServer, opened: tuple[Path, list[str]]) -> None:
    decoy, seen = opened
    relative = os.path.relpath(decoy)
    served = server.state.catalog.entries[0].path.resolve()
    names = [str(decoy), str(decoy / "manifest.json"), relative, "../" * 12 + str(decoy).lstrip("/")]
    names += [f"file://{decoy}", "../../etc/passwd", "/etc/passwd", str(served), str(served.parent)]
    before = server.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    loaded = server.state.pool.loaded()
    for name in names:
        openai_answer = server.post("/v1/images/generations", json={**OPENAI_GEN, "model": name})
        assert openai_answer.status_code == 404, (name, openai_answer.text)
        assert openai_answer.json()["error"]["code"] == "model_not_found"
        override = server.post(
            "/sdapi/v1/txt2img", json={**TXT2IMG, "override_settings": {"sd_model_checkpoint": name}}
        )
        assert override.status_code == 404 and "sd_model_checkpoint" in field_of(override), override.text
        options = server.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert options.status_code == 404 and field_of(options) == "sd_model_checkpoint", options.text
    lora = server.post("/sdapi/v1/txt2img", json={**TXT2IMG, "prompt": f"a fox <lora:{decoy}:1>"})
    assert lora.status_code in (200, 404, 422), lora.text  # A1111 ignores a LoRA it lacks
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before
    assert server.state.pool.loaded() == loaded
    assert seen == []
    (decoy / "manifest.json").read_bytes()  # the watch itself works
    assert seen


# -- CORS ----------------------------------------------------------------------------------------------

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_cors_is_off_by_default(server: LiveServer) -> None:
    simple = server.get("/sdapi/v1/samplers", headers={"Origin": "http://a.test"})
    assert simple.status_code == 200
    assert not any(h.lower().startswith("access-control-") for h in simple.headers)
    preflight = requests.options(
        server.url + "/sdapi/v1/txt2img", headers={"Origin": "http://a.test", **PREFLIGHT}, timeout=60
    )
    assert preflight.status_code >= 400
    assert "access-control-allow-origin" not in {h.lower() for h in preflight.headers}


def test_cors_allows_the_configured_origins(make_server: Callable[..., LiveServer]) -> None:
    live = make_server(cors_origins=("http://a.test",), api_key=KEY)
    bearer = {"Authorization": f"Bearer {KEY}"}
    allowed = live.get("/sdapi/v1/samplers", headers={"Origin": "http://a.test", **bearer})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://a.test"
    other = live.get("/sdapi/v1/samplers", headers={"Origin": "http://b.test", **bearer})
    assert "Access-Control-Allow-Origin" not in other.headers
    # A browser's preflight carries no credentials: it is answered, and the real request then needs the key.
    preflight = requests.options(
        live.url + "/sdapi/v1/txt2img", headers={"Origin": "http://a.test", **PREFLIGHT}, timeout=60
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://a.test"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    refused = requests.options(
        live.url + "/sdapi/v1/txt2img", headers={"Origin": "http://b.test", **PREFLIGHT}, timeout=60
    )
    assert refused.status_code >= 400
    assert "Access-Control-Allow-Origin" not in refused.headers
    anonymous = live.post("/sdapi/v1/txt2img", json=TXT2IMG, headers={"Origin": "http://a.test"})
    assert anonymous.status_code == 401
    assert anonymous.headers.get("Access-Control-Allow-Origin") == "http://a.test"  # the page can read why
    options_anonymous = requests.options(live.url + "/sdapi/v1/txt2img", timeout=60)  # not a preflight
    assert options_anonymous.status_code == 401
