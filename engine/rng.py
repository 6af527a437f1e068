"""torch.randn on a seeded CPU generator, reproduced in NumPy so the runtime stays torch-free.

A seed must give the same initial latents (and ancestral-sampler noise) as diffusers with
`torch.Generator("cpu").manual_seed(seed)`. torch's CPU generator is MT19937 (init_genrand seeding on
the seed's low 32 bits); `torch.randn` then takes one of two paths
(aten/src/ATen/native/cpu/DistributionTemplates.h, aten/src/ATen/core/DistributionsHelper.h):

* 16 elements or more: one 24-bit uniform per element, then Box-Muller in blocks of 16 (pairs j, j+8)
  with avx_mathfun's float32 Cephes log / sincos, as x86 builds (AVX2 and AVX512 kernels) compile them,
  multiply-adds fused. A count that is not a multiple of 16 draws 16 fresh uniforms and redoes the last
  16 elements. We replay those float32 operations, so results are bit-identical there (torch's scalar
  non-AVX kernel, e.g. on ARM, uses libm and differs by up to ~3e-6).
* fewer than 16: per element, double-precision Box-Muller on two 53-bit uniforms, returning the cosine
  and caching the sine in the generator for the next small draw (the cache survives across calls).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

MT_STATE_WORDS = 624
SEED_MIN = -(2**63)  # torch.Generator.manual_seed accepts [-2**63, 2**64): int64 or uint64
SEED_MAX = 2**64 - 1
BLOCK = 16  # torch's vectorized normal kernel needs at least this many elements

F32 = np.float32
TWO_PI_F32 = F32(2.0 * math.pi)
LOG_COEFFICIENTS = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)


class TorchGenerator:
    """A stateful stand-in for `torch.Generator("cpu").manual_seed(seed)`; not for sharing across threads.

    Successive `randn` calls return what successive `torch.randn(shape, generator=g)` calls return.
    """

    def __init__(self, seed: int) -> None:
        seed = check_seed(seed)
        self._initial_seed = seed % 2**64
        self._bits = np.random.MT19937()
        self._bits.state = {
            "bit_generator": "MT19937",
            "state": {"key": mt19937_key(seed), "pos": MT_STATE_WORDS},
        }
        self._cached_normal: float | None = None

    @property
    def initial_seed(self) -> int:
        """The seed as torch reports it (`Generator.initial_seed()`: negative seeds wrap to uint64)."""
        return self._initial_seed

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """Standard normal float32 samples, exactly `torch.randn(shape, generator=self)`."""
        dims = normalize_shape(shape)
        count = math.prod(dims)
        if count >= BLOCK:
            flat = self._randn_blocks(count)
        else:
            flat = np.array([self._normal_scalar() for _ in range(count)], dtype=F32)
        return flat.reshape(dims)

    def _randn_blocks(self, count: int) -> np.ndarray:
        """torch's vectorized path: uniforms for every element, then Box-Muller per block of 16."""
        whole = count - count % BLOCK
        normals = box_muller_blocks(self._uniforms24(count)[:whole])
        if whole == count:
            return normals
        tail = box_muller_blocks(self._uniforms24(BLOCK))
        return np.concatenate([normals[: count - BLOCK], tail])

    def _normal_scalar(self) -> float:
        """torch's at::normal_distribution<double>: Box-Muller on two 53-bit uniforms, sine cached."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1, u2 = self._uniforms53(2)
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def _uniforms24(self, count: int) -> np.ndarray:
        """at::uniform_real_distribution<float>(0, 1): the low 24 bits of one 32-bit draw, over 2**24."""
        raw = self._bits.random_raw(count)
        return (raw & 0xFFFFFF).astype(F32) * F32(2.0**-24)

    def _uniforms53(self, count: int) -> list[float]:
        """at::uniform_real_distribution<double>(0, 1): 53 low bits of (first draw << 32 | second)."""
        raw = [int(word) for word in self._bits.random_raw(2 * count)]
        return [
            (((hi << 32) | lo) & (2**53 - 1)) * 2.0**-53 for hi, lo in zip(raw[::2], raw[1::2], strict=True)
        ]


def seeded_generators(seed: int, count: int) -> list[TorchGenerator]:
    """One generator per image, seeded seed, seed + 1, ... as the pipeline contract requires."""
    if count < 0:
        raise ValueError(f"generator count must be >= 0, got {count}")
    return [TorchGenerator(seed + index) for index in range(count)]


def randn_batch(generators: Sequence[TorchGenerator], shape: int | Sequence[int]) -> np.ndarray:
    """diffusers' `randn_tensor(shape, generator=[g0, g1, ...])`: one (1, ...) draw per generator.

    A single generator draws the whole shape at once, as diffusers does for a one-element list.
    """
    dims = normalize_shape(shape)
    if not generators:
        raise ValueError("randn_batch needs at least one generator")
    if len(generators) == 1:
        return generators[0].randn(dims)
    if not dims or dims[0] != len(generators):
        raise ValueError(f"{len(generators)} generators for a batch of shape {dims}: need one per item")
    return np.concatenate([generator.randn((1, *dims[1:])) for generator in generators], axis=0)


def check_seed(seed: int) -> int:
    """The seed as an int in torch's accepted range; bools and floats are refused."""
    if isinstance(seed, bool):
        raise TypeError("seed must be an integer, not a bool")
    seed = operator.index(seed)
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed {seed} is outside torch's range [-2**63, 2**64 - 1]")
    return seed


def normalize_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """A shape as a tuple of non-negative ints; a bare int means a 1-D shape, as in torch.randn(3)."""
    dims = (
        (operator.index(shape),)
        if isinstance(shape, (int, np.integer))
        else tuple(map(operator.index, shape))
    )
    if any(size < 0 for size in dims):
        raise ValueError(f"shape {dims} has a negative size")
    return dims


def mt19937_key(seed: int) -> np.ndarray:
    """MT19937 init_genrand state for the seed's low 32 bits (torch's at::mt19937 seeding)."""
    word = seed & 0xFFFFFFFF
    key = [word]
    for index in range(1, MT_STATE_WORDS):
        word = (1812433253 * (word ^ (word >> 30)) + index) & 0xFFFFFFFF
        key.append(word)
    return np.array(key, dtype=np.uint32)


def box_muller_blocks(uniforms: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16_AVX2 over consecutive blocks of 16 uniforms in [0, 1) (mean 0, std 1)."""
    blocks = uniforms.reshape(-1, 2, BLOCK // 2)
    radius = np.sqrt(F32(-2.0) * cephes_log(F32(1.0) - blocks[:, 0]))
    sine, cosine = cephes_sincos(TWO_PI_F32 * blocks[:, 1])
    return np.concatenate([radius * cosine, radius * sine], axis=1).reshape(-1)


def fma32(a: np.ndarray | np.float32, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 fused multiply-add: the float64 product of two float32s is exact, one rounding after."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F32)


def cephes_log(x: np.ndarray) -> np.ndarray:
    """avx_mathfun's log256_ps for positive float32 x, with the multiply-adds torch's build fuses."""
    bits = np.maximum(x, np.uint32(0x00800000).view(F32)).view(np.uint32)
    exponent = ((bits >> 23).astype(np.int32) - 0x7F).astype(F32) + F32(1.0)
    mantissa = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(F32)  # in [0.5, 1)
    small = mantissa < F32(0.707106781186547524)
    m = (mantissa - F32(1.0)) + np.where(small, mantissa, F32(0.0))
    exponent = exponent - small.astype(F32)
    z = m * m
    y = np.full_like(m, F32(LOG_COEFFICIENTS[0]))
    for coefficient in LOG_COEFFICIENTS[1:]:
        y = fma32(y, m, F32(coefficient))
    y = fma32(y * m, z, exponent * F32(-2.12194440e-4))
    y = fma32(z, F32(-0.5), y)
    return fma32(exponent, F32(0.693359375), m + y)


def cephes_sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun's sincos256_ps for float32 x (Cephes range reduction by pi/4, two polynomials)."""
    sign_sin = x.view(np.uint32) & np.uint32(0x80000000)
    x = np.abs(x)
    octant = (x * F32(1.27323954473516)).astype(np.int32)
    octant = (octant + 1) & ~1
    sign_sin = sign_sin ^ ((octant & 4).astype(np.uint32) << 29)
    sign_cos = ((~(octant - 2)) & 4).astype(np.uint32) << 29
    use_sine_poly = (octant & 2) == 0
    q = octant.astype(F32)
    x = fma32(q, F32(-0.78515625), x)
    x = fma32(q, F32(-2.4187564849853515625e-4), x)
    x = fma32(q, F32(-3.77489497744594108e-8), x)
    z = x * x
    cos_poly = fma32(
        fma32(F32(2.443315711809948e-5), z, F32(-1.388731625493765e-3)), z, F32(4.166664568298827e-2)
    )
    cos_poly = fma32(cos_poly * z, z, -(z * F32(0.5))) + F32(1.0)
    sin_poly = fma32(fma32(F32(-1.9515295891e-4), z, F32(8.3321608736e-3)), z, F32(-1.6666654611e-1))
    sin_poly = fma32(sin_poly * z, x, x)
    sine = np.where(use_sine_poly, sin_poly, cos_poly).view(np.uint32) ^ sign_sin
    cosine = np.where(use_sine_poly, cos_poly, sin_poly).view(np.uint32) ^ sign_cos
    return sine.view(F32), cosine.view(F32)
