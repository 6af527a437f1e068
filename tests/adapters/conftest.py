"""The tiny diffusers pipeline the parity tests load LoRAs into, its LoRA targets and base weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.adapters import Target
from tests.adapters.lora_files import lora_targets_of, weights_of


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model: Path) -> Any:
    diffusers = pytest.importorskip("diffusers")
    return diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )


@pytest.fixture(scope="session")
def tiny_targets(tiny_pipe: Any) -> dict[Target, tuple[int, ...]]:
    return lora_targets_of(tiny_pipe.unet, tiny_pipe.text_encoder)


@pytest.fixture(scope="session")
def tiny_weights(tiny_pipe: Any, tiny_targets: dict) -> dict[Target, np.ndarray]:
    return weights_of(tiny_pipe.unet, tiny_pipe.text_encoder, tiny_targets)
