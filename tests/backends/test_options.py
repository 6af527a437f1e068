"""Backend options: enum values by name, one-line errors that list what is valid."""

from __future__ import annotations

import pytest

from engine.backends.onnxruntime import OrtOptions, Provider
from engine.backends.options import parse_backend_options
from engine.errors import EngineError


def test_enum_fields_are_taken_by_value_and_none_stays_none() -> None:
    options = parse_backend_options(
        OrtOptions, {"provider": "CPUExecutionProvider", "cuda_graph": False}, "x"
    )
    assert options.provider is Provider.CPU and options.cuda_graph is False
    assert parse_backend_options(OrtOptions, {"provider": None}, "x").provider is None


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"provider": "TPU"}, "'TPU' is not a valid Provider"),
        ({"threads": 2}, "unexpected keyword argument 'threads'"),
    ],
)
def test_bad_options_name_the_valid_ones(options: dict, needle: str) -> None:
    with pytest.raises(EngineError) as info:
        parse_backend_options(OrtOptions, options, "onnxruntime")
    message = str(info.value)
    assert message.startswith("bad onnxruntime backend options") and needle in message
    assert "valid: provider, intra_op_threads" in message
    assert "provider: CPUExecutionProvider, CUDAExecutionProvider" in message and "\n" not in message
