"""Dynamic batching (Pipeline.run_batch), step control (stop / cancel), step latents and their previews.

run_batch must give bitwise the images ``run`` gives request by request: each image draws its noise
from its own seed's generator, so only the UNet batch is shared. Real ONNX Runtime on the tiny engine.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import Pipeline
from engine.errors import Cancelled, RequestError
from engine.pipeline import GenerationRequest, GenerationResult, StepControl, StepInfo
from engine.pipeline.images import to_pil
from engine.pipeline.previews import SD_LATENT_RGB, latent_preview, latent_rgb, preview_png_base64

SIZE = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def fused(tiny_engine: Path) -> Pipeline:
    pipe = Pipeline.load(tiny_engine)
    assert pipe.fused_cfg  # the tiny engine has the unet_cfg graph: guidance runs inside it
    return pipe


@pytest.fixture(scope="module")
def plain(tiny_engine: Path) -> Pipeline:
    return Pipeline.load(tiny_engine, fused_cfg=False)


def three_requests(rng: np.random.Generator, **settings: object) -> list[GenerationRequest]:
    """One image, a batch of 2, and two prompts with their own negatives: 5 images, 3 random seeds."""
    seeds = [int(s) for s in rng.integers(0, 2**31, size=3)]
    common = {"steps": 4, **SIZE, **settings}
    return [
        GenerationRequest.create("a red fox in the snow", seed=seeds[0], **common),
        GenerationRequest.create("a lighthouse at dusk", "blurry", seed=seeds[1], batch_size=2, **common),
        GenerationRequest.create(
            ["a bowl of fruit", "a city at night"], ["low quality", "daylight"], seed=seeds[2], **common
        ),
    ]


def pixels(result: GenerationResult) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


def assert_same_result(batched: GenerationResult, solo: GenerationResult) -> None:
    assert batched.seeds == solo.seeds
    assert batched.parameters == solo.parameters
    assert batched.steps_done == solo.steps_done and not batched.stopped_early
    assert batched.latents is not None and solo.latents is not None
    assert batched.latents.shape == solo.latents.shape and batched.latents.dtype == np.float32
    np.testing.assert_array_equal(batched.latents, solo.latents)  # bitwise: same values, same NaN-free
    assert len(batched.images) == len(solo.images)
    for ours, theirs in zip(pixels(batched), pixels(solo), strict=True):
        np.testing.assert_array_equal(ours, theirs)


# -- run_batch == run, request by request ---------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "settings"),
    [
        ("fused", {"sampler": "Euler a"}),  # ancestral: fresh noise per step from each image's generator
        ("fused", {"sampler": "DPM++ 2M SDE"}),  # SDE: noise per step, multistep history
        ("fused", {"sampler": "DPM++ SDE"}),  # SDE, 2 evaluations a step, noise between them
        ("fused", {"sampler": "DPM++ 2M Karras"}),  # deterministic multistep
        ("fused", {"sampler": "Euler a", "guidance_scale": 1.0}),  # guidance off: plain UNet, B not 2B
        ("fused", {"sampler": "DPM++ 2M Karras", "guidance_rescale": 0.7}),  # rescale: host-side CFG
        ("plain", {"sampler": "Euler a", "guidance_rescale": 0.7}),
        ("plain", {"sampler": "DPM++ 2M SDE"}),  # host-side CFG without rescale
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(map(str, value.values())),
)
def test_run_batch_is_bitwise_the_solo_runs(
    request: pytest.FixtureRequest, rng: np.random.Generator, which: str, settings: dict
) -> None:
    pipe: Pipeline = request.getfixturevalue(which)
    requests = three_requests(rng, **settings)
    seen: list[StepInfo] = []
    batched = pipe.run_batch(requests, on_step=seen.append)
    solos = [pipe.run(r) for r in requests]
    assert len(batched) == 3
    for result, solo, req in zip(batched, solos, requests, strict=True):
        assert result.seeds == req.seeds and len(result.images) == req.num_images
        assert_same_result(result, solo)
    # One UNet batch of all 5 images, every step seen once.
    total = solos[0].steps_done
    assert [(s.step, s.total) for s in seen] == [(i, total) for i in range(1, total + 1)]
    assert all(s.latents is not None and s.latents.shape == (5, 4, 8, 8) for s in seen)
    final = np.concatenate([r.latents for r in batched])
    np.testing.assert_array_equal(seen[-1].latents, final)
    # The images really differ from one another (own seeds, own prompts), so equality above means something.
    images = [p for r in batched for p in pixels(r)]
    assert all(not np.array_equal(images[0], other) for other in images[1:])


def test_run_batch_of_one_is_run(fused: Pipeline, rng: np.random.Generator) -> None:
    (only,) = three_requests(rng, sampler="Euler a")[1:2]
    (result,) = fused.run_batch([only])
    assert_same_result(result, fused.run(only))


# -- batch_key and merge --------------------------------------------------------------------------


def test_batch_key_ignores_prompts_seeds_and_batch_size(rng: np.random.Generator) -> None:
    requests = three_requests(rng, sampler="DPM++ 2M Karras")
    assert len({r.batch_key for r in requests}) == 1
    merged = GenerationRequest.merge(requests)
    assert merged.batch_size == 1 and merged.num_images == 5
    assert merged.prompts == (
        "a red fox in the snow", "a lighthouse at dusk", "a lighthouse at dusk", "a bowl of fruit",
        "a city at night",
    )  # fmt: skip
    assert merged.negative_prompts == ("", "blurry", "blurry", "low quality", "daylight")
    assert merged.batch_key == requests[0].batch_key


@pytest.mark.parametrize(
    "other",
    [
        {"steps": 5},
        {"width": 72},
        {"height": 56},
        {"sampler": "Euler"},
        {"guidance_scale": 5.0},
        {"guidance_rescale": 0.3},
        {"clip_skip": 2},
        {"image": Image.new("RGB", (64, 64), (90, 30, 200))},
        {"latents": np.zeros((1, 4, 8, 8), np.float32)},
    ],
)
def test_merge_refuses_incompatible_requests(fused: Pipeline, other: dict) -> None:
    base = {"steps": 4, **SIZE, "sampler": "Euler a", "seed": 1}
    first = GenerationRequest.create("a red fox", **base)
    second = GenerationRequest.create("a blue fox", **{**base, **other})
    for requests in ([first, second], [second, first]):
        with pytest.raises(RequestError, match="can share a batch") as error:
            GenerationRequest.merge(requests)
        assert "\n" not in str(error.value)
        with pytest.raises(RequestError, match="can share a batch"):
            fused.run_batch(requests)
    if "image" in other or "latents" in other:
        assert second.batch_key is None
        with pytest.raises(RequestError, match="can share a batch"):
            GenerationRequest.merge([second, second])  # not even with itself


def test_merge_refuses_no_requests() -> None:
    with pytest.raises(RequestError, match="can share a batch"):
        GenerationRequest.merge([])


# -- stop and cancel ------------------------------------------------------------------------------


def recorder(stop_at: int | None = None, answer: object = StepControl.STOP):
    """A step callback keeping a copy of every step's latents, answering ``answer`` at ``stop_at``."""
    kept: list[np.ndarray] = []

    def on_step(info: StepInfo) -> object:
        assert info.latents is not None
        kept.append(np.array(info.latents, copy=True))
        return answer if info.step == stop_at else StepControl.CONTINUE

    return on_step, kept


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_stop_decodes_the_partial_latents(fused: Pipeline, rng: np.random.Generator, sampler: str) -> None:
    seed = int(rng.integers(0, 2**31))
    request = GenerationRequest.create("a lighthouse", "blurry", steps=6, seed=seed, sampler=sampler, **SIZE)
    whole_step, whole = recorder()
    full = fused.run(request, whole_step)
    assert full.steps_done == 6 and not full.stopped_early
    on_step, kept = recorder(stop_at=2)
    stopped = fused.run(request, on_step)
    assert len(kept) == 2  # no step after the stop
    assert stopped.steps_done == 2 and stopped.stopped_early
    assert stopped.seeds == full.seeds and stopped.parameters == full.parameters
    np.testing.assert_array_equal(stopped.latents, kept[1])  # the latents step 2 showed
    np.testing.assert_array_equal(kept[1], whole[1])  # which a full run passes through
    expected = to_pil(fused.decode(kept[1]))
    for ours, theirs in zip(stopped.images, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert not np.array_equal(np.asarray(stopped.images[0]), np.asarray(full.images[0]))


def test_stop_at_the_last_step_is_not_early(fused: Pipeline) -> None:
    request = GenerationRequest.create("a fox", steps=4, seed=5, sampler="Euler", **SIZE)
    on_step, kept = recorder(stop_at=4)
    result = fused.run(request, on_step)
    assert result.steps_done == 4 and not result.stopped_early and len(kept) == 4


def test_stop_in_a_batch_stops_every_request(fused: Pipeline, rng: np.random.Generator) -> None:
    requests = three_requests(rng, sampler="Euler a", steps=5)
    on_step, kept = recorder(stop_at=3)
    results = fused.run_batch(requests, on_step)
    assert len(kept) == 3 and kept[-1].shape == (5, 4, 8, 8)
    np.testing.assert_array_equal(np.concatenate([r.latents for r in results]), kept[-1])
    expected = to_pil(fused.decode(kept[-1]))
    assert [np.asarray(im).tobytes() for r in results for im in r.images] == [
        np.asarray(im).tobytes() for im in expected
    ]
    for result in results:
        assert result.steps_done == 3 and result.stopped_early


@pytest.mark.parametrize("answer", [StepControl.CANCEL, False, "cancel"])
@pytest.mark.parametrize("batched", [False, True])
def test_cancel_raises_cancelled(
    fused: Pipeline, rng: np.random.Generator, answer: object, batched: bool
) -> None:
    requests = three_requests(rng, sampler="DPM++ 2M Karras")
    on_step, kept = recorder(stop_at=2, answer=answer)
    with pytest.raises(Cancelled, match="cancelled at step 2/4"):
        if batched:
            fused.run_batch(requests, on_step)
        else:
            fused.run(requests[1], on_step)
    assert len(kept) == 2


@pytest.mark.parametrize("answer", [None, True, StepControl.CONTINUE])
def test_other_answers_go_on(fused: Pipeline, answer: object) -> None:
    request = GenerationRequest.create("a fox", steps=4, seed=5, sampler="Euler", **SIZE)
    result = fused.run(request, lambda info: answer)
    assert result.steps_done == 4 and not result.stopped_early


def test_step_latents_have_the_images_shape(fused: Pipeline) -> None:
    request = GenerationRequest.create(["a", "b"], steps=4, seed=5, batch_size=2, width=64, height=48)
    seen: list[StepInfo] = []
    fused.run(request, seen.append)
    assert [s.latents.shape for s in seen] == [(4, 4, 6, 8)] * 4
    assert all(s.latents.dtype == np.float32 for s in seen)


# -- previews -------------------------------------------------------------------------------------


def test_preview_shape_and_dtype(rng: np.random.Generator) -> None:
    latents = rng.standard_normal((3, 4, 8, 6), dtype=np.float32)
    images = latent_preview(latents)
    assert len(images) == 3
    assert all(im.mode == "RGB" and im.size == (6, 8) for im in images)
    array = np.asarray(images[2])
    assert array.shape == (8, 6, 3) and array.dtype == np.uint8
    np.testing.assert_array_equal(latent_rgb(latents)[2], array)


def test_preview_of_a_constant_latent_by_hand() -> None:
    latents = np.empty((1, 4, 3, 5), np.float32)
    latents[0] = np.array([1.0, 0.5, -0.5, 0.25], np.float32)[:, None, None]
    # R = .298 + .5*.187 - .5*-.158 + .25*-.184 = .4245       -> (1.4245) * 127.5 = 181.6 -> 182
    # G = .207 + .5*.286 - .5*.189 + .25*-.271 = .18775       -> 151.4 -> 151
    # B = .208 + .5*.173 - .5*.264 + .25*-.473 = .04425       -> 133.1 -> 133
    array = np.asarray(latent_preview(latents)[0])
    assert (array == np.array([182, 151, 133], np.uint8)).all()
    white = np.zeros((1, 4, 2, 2), np.float32)
    white[:, 0] = 10.0  # every factor of channel 0 is positive: clipped to 255
    assert (latent_rgb(white) == 255).all()
    assert (latent_rgb(-white) == 0).all()


def test_preview_rows_are_the_published_factors() -> None:
    assert SD_LATENT_RGB.shape == (4, 3)
    np.testing.assert_allclose(SD_LATENT_RGB[3], [-0.184, -0.271, -0.473])
    assert not SD_LATENT_RGB.flags.writeable


def test_preview_png_base64_is_the_preview(rng: np.random.Generator) -> None:
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    text = preview_png_base64(latents, index=1)
    assert isinstance(text, str) and not text.startswith("data:")
    image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    assert image.format == "PNG" and image.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(latent_preview(latents)[1]))


def test_preview_of_step_latents(fused: Pipeline) -> None:
    """The use it is for: a callback turns StepInfo.latents into a preview at every step."""
    previews: list[str] = []
    request = GenerationRequest.create("a fox", steps=3, seed=2, batch_size=2, **SIZE)
    fused.run(request, lambda info: previews.append(preview_png_base64(info.latents, 1)))
    assert len(previews) == 3 and len(set(previews)) == 3


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (np.zeros((4, 8, 8), np.float32), r"shape \(B, 4, h, w\).*got \[4, 8, 8\]"),
        (np.zeros((1, 1, 4, 8, 8), np.float32), r"got \[1, 1, 4, 8, 8\]"),
        (np.zeros((1, 3, 8, 8), np.float32), r"got \[1, 3, 8, 8\]"),
        (np.zeros((1, 16, 8, 8), np.float32), r"got \[1, 16, 8, 8\]"),
        (np.zeros((1, 4, 0, 8), np.float32), r"got \[1, 4, 0, 8\]"),
        ([[[[0.0]]]], "float array, got list"),
        (np.zeros((1, 4, 8, 8), np.complex64), "got dtype complex64"),
    ],
)
def test_preview_refuses_bad_latents(latents: object, message: str) -> None:
    for call in (latent_preview, preview_png_base64):
        with pytest.raises(RequestError, match=message) as error:
            call(latents)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("index", [2, -1, 1.0, True])
def test_preview_refuses_bad_index(index: object) -> None:
    with pytest.raises(RequestError, match=r"preview index must be an integer in 0\.\.1"):
        preview_png_base64(np.zeros((2, 4, 8, 8), np.float32), index)
