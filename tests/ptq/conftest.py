import pytest
import torch

from tests.tiny_models import make_tiny


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture
def tiny_images():
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
