import pytest
import torch

from dictionary_learning import load_model


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def model64(request):
    """A tiny model in float64, so finite differences and sums are exact enough to compare (Llama's
    RMSNorm still computes in float32)."""
    return load_model(request.param, dtype=torch.float64)
