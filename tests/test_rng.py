"""engine.rng against torch.randn on a seeded CPU generator, element by element."""

from __future__ import annotations

import numpy as np
import pytest

from engine.rng import TorchGenerator, randn_batch, seeded_generators

torch = pytest.importorskip("torch")

SEEDS = [0, 1, 42, 2**31 - 1, 2**32 + 5, 123_456_789_012, 2**64 - 1, -1]
SHAPES = [(1, 4, 64, 64), (2, 4, 9, 7), (15,), (16,), (17,), (1,), (3, 5)]
# torch's x86 builds (AVX2 / AVX512 kernels) run the avx_mathfun Box-Muller we replay bit for bit;
# its plain scalar kernel (ARM, ATEN_CPU_CAPABILITY=default) uses libm and differs by a few ulp.
AVX_TORCH = torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}
TOLERANCE = 1e-6 if AVX_TORCH else 5e-6


def torch_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def torch_randn(generator: torch.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


def assert_matches(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_first_draw_matches_torch(seed: int, shape: tuple[int, ...]) -> None:
    assert_matches(TorchGenerator(seed).randn(shape), torch_randn(torch_generator(seed), shape))


def test_any_seed_matches_torch(rng: np.random.Generator) -> None:
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    shape = (1, 4, int(rng.integers(1, 33)), int(rng.integers(1, 33)))
    assert_matches(TorchGenerator(seed).randn(shape), torch_randn(torch_generator(seed), shape))


@pytest.mark.parametrize("seed", [0, 42, 2**31 - 1])
def test_successive_draws_stay_in_sync(seed: int) -> None:
    # Latents, then per-step ancestral noise from the same generator, as diffusers draws them.
    ours, reference = TorchGenerator(seed), torch_generator(seed)
    for _ in range(4):
        assert_matches(ours.randn((1, 4, 16, 16)), torch_randn(reference, (1, 4, 16, 16)))


@pytest.mark.parametrize("seed", [3, 42, 2**32 + 5])
def test_mixed_sizes_in_sequence(seed: int) -> None:
    # Small draws go through torch's scalar path and leave a cached sine in the generator that a
    # later small draw consumes, even across a large draw in between.
    shapes = [(1, 4, 8, 8), (5,), (1, 4, 8, 8), (3,), (20,), (1,), (), (17,), (2, 3), (0,), (1, 4, 8, 8)]
    ours, reference = TorchGenerator(seed), torch_generator(seed)
    for shape in shapes:
        assert_matches(ours.randn(shape), torch_randn(reference, shape))


@pytest.mark.skipif(not AVX_TORCH, reason="torch uses its libm scalar kernel on this CPU, not avx_mathfun")
def test_latents_are_bit_identical_on_x86_torch() -> None:
    ours = TorchGenerator(1234).randn((2, 4, 64, 64))
    reference = torch_randn(torch_generator(1234), (2, 4, 64, 64))
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))


def test_int_shape_means_one_dimension() -> None:
    assert_matches(TorchGenerator(5).randn(33), torch_randn(torch_generator(5), (33,)))


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3), (4, 1)], ids=str)
def test_randn_batch_matches_diffusers_randn_tensor(shape: tuple[int, ...]) -> None:
    from diffusers.utils.torch_utils import randn_tensor

    seed = 42
    reference = randn_tensor(shape, generator=[torch_generator(seed + i) for i in range(shape[0])])
    ours = randn_batch(seeded_generators(seed, shape[0]), shape)
    assert_matches(ours, reference.numpy())


def test_randn_batch_single_generator_draws_whole_shape() -> None:
    from diffusers.utils.torch_utils import randn_tensor

    reference = randn_tensor((2, 4, 8, 8), generator=[torch_generator(9)])
    assert_matches(randn_batch([TorchGenerator(9)], (2, 4, 8, 8)), reference.numpy())


def test_randn_batch_keeps_each_generator_in_sync() -> None:
    generators = seeded_generators(7, 2)
    references = [torch_generator(7), torch_generator(8)]
    for _ in range(3):
        reference = np.concatenate([torch_randn(g, (1, 4, 8, 8)) for g in references])
        assert_matches(randn_batch(generators, (2, 4, 8, 8)), reference)


def test_randn_batch_rejects_mismatched_generator_count() -> None:
    with pytest.raises(ValueError, match="one per item"):
        randn_batch(seeded_generators(0, 3), (2, 4, 8, 8))
    with pytest.raises(ValueError, match="at least one"):
        randn_batch([], (1, 4))


def test_seeded_generators_use_consecutive_seeds() -> None:
    generators = seeded_generators(100, 3)
    assert [g.initial_seed for g in generators] == [100, 101, 102]
    assert_matches(generators[2].randn((1, 4, 8, 8)), torch_randn(torch_generator(102), (1, 4, 8, 8)))


@pytest.mark.parametrize("seed", [2**32, -1, -(2**63), 2**64 - 1])
def test_seed_range_and_wrapping_follow_torch(seed: int) -> None:
    assert TorchGenerator(seed).initial_seed == torch_generator(seed).initial_seed()


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_out_of_range_seed_is_rejected(seed: int) -> None:
    with pytest.raises(ValueError, match="outside torch's range"):
        TorchGenerator(seed)


@pytest.mark.parametrize("seed", [1.5, "3", True])
def test_non_integer_seed_is_rejected(seed: object) -> None:
    with pytest.raises(TypeError):
        TorchGenerator(seed)  # type: ignore[arg-type]


def test_negative_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        TorchGenerator(0).randn((2, -1))
