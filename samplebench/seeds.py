"""Per-sample randomness: sample i of every cell draws from generators seeded by (seed, i) alone.

As in EDM's generate.py (one generator per image), results then do not depend on batch size,
shard layout, worker count or resuming.
"""

from __future__ import annotations

import numpy as np
import torch

# Streams keep the initial noise, the condition and a sampler's own noise independent.
STREAM_NOISE = 0
STREAM_CONDITION = 1
STREAM_SAMPLER = 2


def sample_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for (seed, sample index, stream), mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for one sample and stream."""
    return torch.Generator(device="cpu").manual_seed(sample_seed(seed, index, stream))


def initial_noise(
    seed: int, indices: list[int], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """x_T for the given sample indices: standard normal, drawn in float64 on the CPU, then cast."""
    rows = [
        torch.randn(shape, generator=generator(seed, i, STREAM_NOISE), dtype=torch.float64) for i in indices
    ]
    return torch.stack(rows).to(device=device, dtype=dtype)


def sampler_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One generator per sample for stochastic samplers (diffusers' randn_tensor takes such a list)."""
    return [generator(seed, i, STREAM_SAMPLER) for i in indices]
