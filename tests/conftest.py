import pytest
import torch

from samplebench.models.gmm import GaussianMixtureModel, MixtureSpec


@pytest.fixture(scope="session")
def gmm() -> GaussianMixtureModel:
    """The default analytic model (16-d, 8 components, Stable Diffusion's schedule)."""
    return GaussianMixtureModel(MixtureSpec(), torch.device("cpu"))
