import pytest
import torch

from samplebench.models.gmm import GaussianMixtureModel, MixtureSpec

# pytest-xdist runs one worker per core: a worker with one intra-op thread is up to 20x faster on
# the analytic model's tiny tensors than one whose threads fight the other worker for the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gmm() -> GaussianMixtureModel:
    """The classic analytic model (MixtureSpec()'s defaults, `model.preset=classic`: 16-d, 8 components,
    Stable Diffusion's schedule); the sweep's default preset is `image` (tests/test_presets.py)."""
    return GaussianMixtureModel(MixtureSpec(), torch.device("cpu"))
