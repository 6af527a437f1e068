"""Slow tier: SD-size random-weight models end to end against diffusers (minutes, ~10 GB RAM).

Run with `python -m pytest -m slow`. The fast tier proves the same paths on tiny models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import Pipeline
from engine.export import export_model
from engine.models.presets import init_random
from tests.reference import diffusers_pipeline, generators, psnr

pytestmark = pytest.mark.slow
PROMPT = "a lighthouse at dusk, oil painting"


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def sd_model_and_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    model = init_random(request.param, root / "model", seed=0)
    return model, export_model(model, root / "engine").engine_dir


def test_sd_preset_at_256px_matches_diffusers(sd_model_and_engine: tuple[Path, Path]) -> None:
    model, engine = sd_model_and_engine
    ours = Pipeline.load(engine).generate(PROMPT, steps=4, width=256, height=256, sampler="Euler a", seed=42)
    ref = diffusers_pipeline(model, "Euler a")(
        PROMPT, num_inference_steps=4, width=256, height=256, generator=generators(42, 1), output_type="np"
    ).images
    assert np.isfinite(np.asarray(ours.images[0], dtype=np.float64)).all()
    assert psnr(ours.images[0], ref[0]) >= 40
