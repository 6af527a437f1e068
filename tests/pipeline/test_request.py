"""The request value: JSON round trip, one seed policy, one sampler resolver, one-line RequestErrors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from engine import schedulers
from engine.errors import EngineError, RequestError
from engine.pipeline.request import MAX_SEED, SETTINGS, GenerationRequest


def _respell(name: str, draw: st.DrawFn) -> str:
    """The same sampler name as a user might type it: any case, runs of spaces, padding."""
    words = ["".join(c.upper() if draw(st.booleans()) else c.lower() for c in word) for word in name.split()]
    gaps = [" " * draw(st.integers(1, 3)) for _ in words[1:]]
    body = words[0] + "".join(gap + word for gap, word in zip(gaps, words[1:], strict=True))
    return " " * draw(st.integers(0, 2)) + body + "\t" * draw(st.integers(0, 1))


@st.composite
def requests(draw: st.DrawFn) -> GenerationRequest:
    prompts = draw(st.lists(st.text(max_size=20), min_size=1, max_size=3))
    negatives = draw(st.sampled_from([prompts[0], prompts, [p[::-1] for p in prompts]]))
    steps = draw(st.integers(1, 1000))
    image = draw(st.none() | hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, max_side=5)
                                         .map(lambda s: (*s[:2], 3))))  # fmt: skip
    strength = draw(st.floats(0.0, 1.0, exclude_min=True))
    assume(image is None or int(steps * strength) >= 1)
    finite = st.floats(width=32, allow_nan=False, allow_infinity=False)  # non-finite latents are refused
    shapes = hnp.array_shapes(min_dims=4, max_dims=4, max_side=3)
    latents = draw(st.none() | hnp.arrays(np.float32, shapes, elements=finite))
    return GenerationRequest.create(
        prompts if draw(st.booleans()) or len(prompts) > 1 else prompts[0],
        negatives,
        steps=steps,
        guidance_scale=draw(st.floats(0, 100) | st.integers(0, 100)),
        guidance_rescale=draw(st.floats(0, 1)),
        clip_skip=draw(st.integers(1, 12)),
        width=draw(st.integers(1, 4096)),
        height=draw(st.integers(1, 4096)),
        sampler=_respell(draw(st.sampled_from(schedulers.names())), draw),
        seed=draw(st.none() | st.integers(-1, MAX_SEED - 1000)),  # room for every image's seed + i
        batch_size=draw(st.integers(1, 64)),
        latents=latents,
        image=image,
        strength=strength,
    )


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_json_round_trip(request: GenerationRequest) -> None:
    data = json.loads(json.dumps(request.to_json()))  # JSON types only
    again = GenerationRequest.from_json(data)
    assert again == request and hash(again) == hash(request)
    assert again.to_json() == request.to_json()
    for name in ("latents", "image"):
        ours, theirs = getattr(request, name), getattr(again, name)
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert theirs.dtype == ours.dtype and theirs.tobytes() == ours.tobytes()


def test_round_trip_keeps_img2img_image_and_latents_by_content() -> None:
    rng = np.random.default_rng()
    pixels = rng.integers(0, 256, size=(40, 24, 3), dtype=np.uint8)
    noise = rng.standard_normal((2, 4, 5, 3), dtype=np.float32)
    request = GenerationRequest.create(
        ["a", "b"], steps=7, image=Image.fromarray(pixels), latents=noise, strength=0.5, seed=1
    )
    data = request.to_json()
    assert isinstance(data["image"], str) and data["latents"]["shape"] == [2, 4, 5, 3]
    again = GenerationRequest.from_json(json.loads(json.dumps(data)))
    assert np.array_equal(again.image, pixels) and np.array_equal(again.latents, noise)
    assert again == request
    other = noise.copy()
    other[0, 0, 0, 0] += 1
    changed = GenerationRequest.create(["a", "b"], steps=7, image=pixels, latents=other, strength=0.5, seed=1)
    assert changed != request


def test_request_keeps_its_own_read_only_copies() -> None:
    noise = np.zeros((1, 4, 8, 8), np.float32)
    pixels = np.zeros((8, 8, 3), np.uint8)
    request = GenerationRequest.create("a", latents=noise, image=pixels)
    noise[:] = 1
    pixels[:] = 1
    assert not request.latents.any() and not request.image.any()
    with pytest.raises(ValueError, match="read-only"):
        request.latents[0, 0, 0, 0] = 2


@pytest.mark.parametrize("seed", [-1, None])
def test_random_seed_is_chosen_once_and_recorded(seed: int | None) -> None:
    chosen = {GenerationRequest.create("a", seed=seed, batch_size=3).seed for _ in range(5)}
    assert len(chosen) > 1 and all(0 <= s <= MAX_SEED for s in chosen)
    request = GenerationRequest.create("a", seed=seed, batch_size=3)
    assert request.to_json()["seed"] == request.seed and request.seeds == [request.seed + i for i in range(3)]
    assert GenerationRequest.from_json(request.to_json()).seed == request.seed  # not drawn again
    assert GenerationRequest(("a",), ("",)).seed >= 0  # the default is random too


@pytest.mark.parametrize("seed", [0, 7, MAX_SEED - 3])
def test_explicit_seed_is_kept_and_each_image_gets_the_next(seed: int) -> None:
    request = GenerationRequest.create(["a", "b"], seed=seed, batch_size=2)
    assert request.seed == seed and request.seeds == [seed, seed + 1, seed + 2, seed + 3]


def test_every_image_seed_stays_replayable() -> None:
    """Image i gets seed + i and records it: each recorded seed must be one a request accepts."""
    with pytest.raises(RequestError, match=r"seed must be -1 \(random\) or an integer in 0\.\.4294967292 "):
        GenerationRequest.create(["a", "b"], seed=MAX_SEED - 2, batch_size=2)
    for _ in range(50):
        assert max(GenerationRequest.create("a", seed=-1, batch_size=64).seeds) <= MAX_SEED
    last = GenerationRequest.create("a", seed=MAX_SEED, batch_size=1)  # one image: the whole range
    assert last.seeds == [MAX_SEED]


@settings(max_examples=100)
@given(st.data())
def test_request_and_schedulers_resolve_sampler_names_alike(data: st.DataObject) -> None:
    canonical = data.draw(st.sampled_from(schedulers.names()))
    typed = _respell(canonical, data.draw)
    request = GenerationRequest.create("a", sampler=typed)
    assert request.sampler == schedulers.resolve(typed) == schedulers.create(typed).name == canonical


@pytest.mark.parametrize("name", ["euler  a", " Euler A ", "EULER A", "dpm++ 2m\tkarras"])
def test_odd_spacing_and_case_resolve(name: str) -> None:
    assert GenerationRequest.create("a", sampler=name).sampler == schedulers.create(name).name


@pytest.mark.parametrize("name", ["Euler z", "eulera", "", "DPM++  2M  Karras  X", 3])
def test_unknown_sampler_is_refused_alike(name: object) -> None:
    with pytest.raises(RequestError) as ours:
        GenerationRequest.create("a", sampler=name)
    with pytest.raises(ValueError) as theirs:
        schedulers.create(name)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith(f"unknown sampler {name!r}; valid: ") and "\n" not in str(ours.value)
    assert "Euler a" in str(ours.value) and "DPM++ 2M Karras" in str(ours.value)


@pytest.mark.parametrize("name", ["stepz", "callback", "prompts", "cfg"])
def test_unknown_setting_is_a_one_line_value_error(name: str) -> None:
    with pytest.raises(ValueError) as error:
        GenerationRequest.create("a", **{name: 1})
    message = str(error.value)
    assert message == f"unknown setting {name!r}; valid settings: {', '.join(SETTINGS)}"
    assert isinstance(error.value, RequestError) and "steps" in message and "seed" in message


# setting -> bad values; each must raise a one-line RequestError that starts with the setting's name.
BAD = {
    "prompt": [[], [1], None, 3],
    "negative_prompt": [[1], ["a", "b"]],
    "steps": [0, 1001, 2.0, True, "20", None],
    "guidance_scale": [-0.1, 100.5, float("nan"), "7", True],
    "guidance_rescale": [-0.1, 1.5],
    "clip_skip": [0, 13, 1.0, True],
    "width": [0, 4097, 64.0],
    "height": [-8, 5000],
    "seed": [-2, MAX_SEED + 1, 1.5, "1"],
    "batch_size": [0, 65],
    "strength": [0, 1.01, -1],
    "latents": [np.zeros((1, 4, 8)), np.zeros((1, 4, 8, 8), np.int32), [[0.0]]],
    "image": [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), "a.png"],
}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in BAD.items() for v in values])
def test_every_bad_setting_is_a_one_line_request_error_naming_it(name: str, value: object) -> None:
    if name == "prompt":
        call = lambda: GenerationRequest.create(value)  # noqa: E731
    elif name == "negative_prompt":
        call = lambda: GenerationRequest.create(["a", "b", "c"], value)  # noqa: E731
    else:
        call = lambda: GenerationRequest.create("a", **{name: value})  # noqa: E731
    with pytest.raises(RequestError) as error:
        call()
    message = str(error.value)
    assert isinstance(error.value, EngineError) and isinstance(error.value, ValueError)
    assert message.startswith(name) and "\n" not in message, message


def test_img2img_strength_must_keep_a_step() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(RequestError, match=r"^strength must be at least 1/3"):
        GenerationRequest.create("a", image=image, steps=3, strength=0.3)
    assert GenerationRequest.create("a", image=image, steps=3, strength=0.34).strength == 0.34
    assert GenerationRequest.create("a", steps=3, strength=0.3).strength == 0.3  # txt2img ignores it


def test_model_checks_happen_in_check_model_only() -> None:
    """Sizes that are not multiples of the VAE factor and latents of the wrong shape pass the builder
    (they depend on the model) and fail check_model, each once."""
    request = GenerationRequest.create("a", width=100, height=64, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(RequestError, match=r"^width must be a multiple of 8, got 100$"):
        request.check_model(vae_scale_factor=8, latent_channels=4, train_timesteps=1000)
    fine = GenerationRequest.create("a", width=64, height=64, latents=np.zeros((1, 4, 8, 8), np.float32))
    fine.check_model(vae_scale_factor=8, latent_channels=4, train_timesteps=1000)
    with pytest.raises(RequestError, match=r"^latents must be of shape \[1, 16, 8, 8\], got shape \[1, 4"):
        fine.check_model(vae_scale_factor=8, latent_channels=16, train_timesteps=1000)
    with pytest.raises(RequestError, match=r"^steps must be at most the model's 10, got 20"):
        fine.check_model(vae_scale_factor=8, latent_channels=4, train_timesteps=10)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"negative_prompt": "x"}, "a JSON request must be an object with a 'prompt'"),
        ({"prompt": "a", "image": "not base64!"}, "image must be a base64-encoded PNG"),
        ({"prompt": "a", "latents": {"shape": [1, 2]}}, "latents must be"),
        ({"prompt": "a", "latents": {"shape": [3], "data": "AAAAAA=="}}, "latents must be"),
        ({"prompt": "a", "stepz": 1}, "unknown setting 'stepz'"),
    ],
)
def test_bad_json_is_a_request_error(data: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        GenerationRequest.from_json(data)


def test_from_json_accepts_a_hand_written_job() -> None:
    request = GenerationRequest.from_json({"prompt": "a fox", "sampler": "dpm++ 2m karras", "seed": -1})
    assert request.prompts == ("a fox",) and request.negative_prompts == ("",)
    assert request.sampler == "DPM++ 2M Karras" and 0 <= request.seed <= MAX_SEED and request.steps == 20
