import pytest
import torch

from zsq.assets import asset, assets_dir


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield


def need_asset(rel: str):
    """Path of a shared asset, or skip the test with a reason saying where it was looked for."""
    p = asset(rel)
    if not p.exists():
        pytest.skip(f"shared asset {rel} not found under {assets_dir()} (set ZSQ_ASSETS to its folder)")
    return p
