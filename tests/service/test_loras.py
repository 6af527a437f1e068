"""LoRAs in the service (issue 15): ``serve --lora-dir DIR``, ``GET /sdapi/v1/loras``, ``<lora:NAME:W>`` tags
in A1111 and OpenAI prompts, with the real ``webuiapi`` and ``openai`` clients against a live server.

Every image must equal, pixel for pixel, ``Pipeline.load(tiny_engine, lora_dir=DIR).generate(...)`` with
the same prompt; a request without a tag after one with a tag is the base image again; a LoRA the engine
cannot use is a one-line 4xx naming it (422 on A1111's routes, 400 on OpenAI's), never a 500, and the
server keeps serving.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests
import webuiapi
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from engine import Pipeline
from engine.service.openai_images import DEFAULT_CFG, DEFAULT_SAMPLER
from tests.commands.test_cli_lora import LORA_ALIAS, LORA_FILE, LORA_NAME, SDXL_FILE, write_lora_folder
from tests.service.conftest import LiveServer, live_server, tiny_config

API = "/sdapi/v1"
TXT2IMG = f"{API}/txt2img"
GENERATIONS = "/v1/images/generations"
PROMPT = "a paper crane"
TAGGED = f"{PROMPT} <lora:{LORA_NAME}:0.8>"
SEED = 33
SIZE = {"width": 64, "height": 64, "steps": 2, "seed": SEED}
A1111_SMALL = {**SIZE, "cfg_scale": 6.0, "sampler_name": "Euler a"}
PIPE_SMALL = {**SIZE, "guidance_scale": 6.0, "sampler": "Euler a"}  # the same as Pipeline.generate keywords


# -- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora_folder(tiny_model, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def lora_server(tiny_engine: Path, lora_dir: Path) -> Iterator[LiveServer]:
    """One server with the LoRA folder, for the whole module."""
    with live_server(tiny_config(tiny_engine, lora_dir=lora_dir)) as live:
        yield live


@pytest.fixture(scope="module")
def pipe(tiny_engine: Path, lora_dir: Path) -> Pipeline:
    """The reference: the engine folder loaded outside the server with the same LoRA folder."""
    return Pipeline.load(tiny_engine, lora_dir=lora_dir)


@pytest.fixture(scope="module")
def api(lora_server: LiveServer) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=lora_server.url + API, sampler="Euler a", steps=2)


def reference(pipe: Pipeline, prompt: str, **settings: Any) -> tuple[np.ndarray, str]:
    """The pipeline's image (HxWx3 uint8) and infotext for ``prompt`` at the tests' A1111 settings."""
    result = pipe.generate(prompt, **{**PIPE_SMALL, **settings})
    return np.asarray(result.images[0]), result.infotext(0)


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def assert_one_line_error(response: requests.Response, status: int, *named: str) -> str:
    """A JSON ``status`` answer whose message is one line naming each of ``named``; returns the message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    error = body["error"] if isinstance(body.get("error"), dict) else body  # OpenAI's shape, else A1111's
    message = error.get("message") or error.get("detail")
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message, body
    for name in named:
        assert name in message, f"{name!r} not named in {message!r}"
    return message


KINDS = ("received", "succeeded", "failed", "rejected")


def counters(live: LiveServer) -> dict[tuple[str, str], float]:
    """(sample name, api) -> value for the sd_engine_requests_*_total counters of GET /metrics."""
    text = requests.get(live.url + "/metrics", timeout=30).text
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("sd_engine_requests_") and sample.name.endswith("_total"):
                key = (sample.name, sample.labels.get("api", ""))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


# -- listing ---------------------------------------------------------------------------------------------


def test_webuiapi_lists_the_loras(api: webuiapi.WebUIApi, lora_server: LiveServer, lora_dir: Path) -> None:
    listed = {entry["name"]: entry for entry in api.get_loras()}
    assert sorted(listed) == [LORA_NAME, Path(SDXL_FILE).stem]
    entry = listed[LORA_NAME]
    assert entry["alias"] == LORA_ALIAS
    assert Path(entry["path"]).resolve() == (lora_dir / LORA_FILE).resolve()
    assert entry["metadata"]["ss_output_name"] == LORA_ALIAS
    assert listed["xl-thing"]["alias"] == "[XL]test"
    assert lora_server.post(f"{API}/refresh-loras").status_code == 200
    assert lora_server.get(f"{API}/loras").json() == api.get_loras()


def test_no_lora_dir_lists_nothing(server: LiveServer) -> None:
    answer = server.get(f"{API}/loras")
    assert answer.status_code == 200 and answer.json() == []


# -- images ----------------------------------------------------------------------------------------------


def test_txt2img_tag_equals_pipeline_and_switching_back_is_exact(
    api: webuiapi.WebUIApi, pipe: Pipeline
) -> None:
    expected, infotext = reference(pipe, TAGGED)
    base, base_infotext = reference(pipe, PROMPT)
    assert not np.array_equal(expected, base), "the LoRA must change the image"
    assert "Lora hashes: " in infotext and "Lora hashes" not in base_infotext

    tagged = api.txt2img(prompt=TAGGED, **A1111_SMALL)
    np.testing.assert_array_equal(np.asarray(tagged.image.convert("RGB")), expected)
    assert tagged.info["prompt"] == TAGGED  # as typed, tag included
    assert tagged.info["infotexts"] == [infotext]
    assert f'Lora hashes: "{LORA_NAME}: ' in tagged.image.info["parameters"]

    plain = api.txt2img(prompt=PROMPT, **A1111_SMALL)
    np.testing.assert_array_equal(np.asarray(plain.image.convert("RGB")), base)
    assert plain.info["infotexts"] == [base_infotext]


def test_tag_by_alias_and_in_the_negative_prompt(api: webuiapi.WebUIApi, pipe: Pipeline) -> None:
    """The alias (``ss_output_name``, brackets and a space) names the same file; tags in the negative
    prompt are not applied (A1111 reads LoRA tags from the prompt only)."""
    by_name, _ = reference(pipe, TAGGED)
    by_alias = api.txt2img(prompt=f"{PROMPT} <lora:{LORA_ALIAS}:0.8>", **A1111_SMALL)
    np.testing.assert_array_equal(np.asarray(by_alias.image.convert("RGB")), by_name)
    negative = f"<lora:{LORA_NAME}:0.8>"
    expected, _ = reference(pipe, PROMPT, negative_prompt=negative)
    result = api.txt2img(prompt=PROMPT, negative_prompt=negative, **A1111_SMALL)
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), expected)


def test_openai_prompt_tag_equals_pipeline(lora_server: LiveServer, pipe: Pipeline) -> None:
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.images.generate(prompt=TAGGED, size="64x64", extra_body={"steps": 2, "seed": SEED})
    expected, _ = reference(pipe, TAGGED, guidance_scale=DEFAULT_CFG, sampler=DEFAULT_SAMPLER)
    np.testing.assert_array_equal(pixels(response.data[0].b64_json), expected)


# -- errors ----------------------------------------------------------------------------------------------

A1111_ERRORS = {  # id -> (prompt, words the message must hold)
    "unknown-name": (f"{PROMPT} <lora:no-such-lora:0.5>", ("no-such-lora",)),
    "sdxl": (f"{PROMPT} <lora:xl-thing>", ("SDXL",)),
    "other-network": (f"{PROMPT} <hypernet:thing:1>", ("hypernet",)),
}


def test_unusable_loras_are_4xx_and_the_server_keeps_serving(
    lora_server: LiveServer, api: webuiapi.WebUIApi, pipe: Pipeline
) -> None:
    before = counters(lora_server)
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for case, (prompt, named) in A1111_ERRORS.items():
        answer = lora_server.post(TXT2IMG, json={"prompt": prompt, **A1111_SMALL})
        assert_one_line_error(answer, 422, *named)
        assert answer.json()["field"] == "prompt", case
        with pytest.raises(openai.BadRequestError) as raised:
            client.images.generate(prompt=prompt, size="64x64", extra_body={"steps": 2, "seed": SEED})
        assert raised.value.status_code == 400, case
        message = raised.value.body["message"]
        assert "\n" not in message and all(word in message for word in named), (case, message)
    sent = len(A1111_ERRORS)

    expected, _ = reference(pipe, TAGGED)  # still serving, LoRAs included
    result = api.txt2img(prompt=TAGGED, **A1111_SMALL)
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), expected)

    deadline = time.monotonic() + 30  # the counters balance: every refusal counted once, none as a success
    while True:
        after = counters(lora_server)
        delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
        received = delta.get(("sd_engine_requests_received_total", "a1111_txt2img"), 0.0)
        if received == sent + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for api_name, answered in (("a1111_txt2img", sent + 1), ("openai_generations", sent)):
        got = {kind: delta.get((f"sd_engine_requests_{kind}_total", api_name), 0.0) for kind in KINDS}
        assert got["received"] == answered, (api_name, got)
        assert got["received"] == got["succeeded"] + got["failed"] + got["rejected"], (api_name, got)
        assert got["succeeded"] == answered - sent, (api_name, got)


@pytest.mark.parametrize("route", ["a1111", "openai"])
def test_a_tag_with_a_bad_multiplier_is_4xx_and_the_server_keeps_serving(make_server, route: str) -> None:
    """``<lora:NAME:heavy>`` is refused in one line; it must not stop the engine's worker (each server
    here gives up on a request after 20 s, so a stopped worker fails the test rather than hanging it)."""
    live = make_server(request_timeout_s=20.0)
    prompt = f"{PROMPT} <lora:{LORA_NAME}:heavy>"
    if route == "a1111":
        answer = live.post(TXT2IMG, json={"prompt": prompt, **A1111_SMALL})
        assert_one_line_error(answer, 422, "heavy")
    else:
        answer = live.post(GENERATIONS, json={"prompt": prompt, "size": "64x64", "steps": 2})
        assert_one_line_error(answer, 400, "heavy")
    after = live.post(TXT2IMG, json={"prompt": PROMPT, **A1111_SMALL})
    assert after.status_code == 200, after.text[:300]


def test_tags_name_loras_in_the_folder_only(
    server: LiveServer, lora_server: LiveServer, lora_dir: Path, tmp_path: Path
) -> None:
    """A prompt is the client's; the server's disk is not: a tag holding a path (A1111 takes names only)
    is an unknown name, never a file read from anywhere on the server, with or without a LoRA folder,
    and whether or not something exists at that path."""
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(lora_dir / LORA_FILE, outside)
    present, absent = str(outside), str(tmp_path / "absent.safetensors")
    for live in (server, lora_server):
        answers = [
            live.post(TXT2IMG, json={"prompt": f"{PROMPT} <lora:{path}:0.8>", **A1111_SMALL})
            for path in (present, absent)
        ]
        messages = [assert_one_line_error(a, 422, p) for a, p in zip(answers, (present, absent), strict=True)]
        assert messages[0].replace(present, absent) == messages[1]  # no hint of what exists


# -- the command line ------------------------------------------------------------------------------------


def test_serve_with_a_missing_lora_dir_is_one_line(tiny_engine: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    command = [sys.executable, "-m", "engine.cli", "serve", str(tiny_engine), "--lora-dir", str(missing)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(missing) in lines[0] and "--lora-dir" in lines[0]
