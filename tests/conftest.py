import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail at once, not retry for ~46 s
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

from dictionary_learning import load_model  # noqa: E402

# DL_TEST_DEVICE=cuda python -m pytest: the models of the fixtures below (tiny ones and SmolLM2)
# load on that device, and tests that create dictionaries or tensors of their own ask the `device`
# fixture where to put them
DEVICE = os.environ.get("DL_TEST_DEVICE", "cpu")


def pytest_configure(config):
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"DL_TEST_DEVICE={DEVICE} but torch sees no CUDA device")


@pytest.fixture(scope="session")
def device():
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama", device=DEVICE)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return load_model("tiny-gpt2", device=DEVICE)


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2):
    return {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}[request.param]


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m", device=DEVICE)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def eager_model(request):
    """A tiny model whose attention modules return their patterns (as SCAE needs); one per test
    module, since SCAE fine-tuning freezes the model's parameters."""
    return load_model(request.param, device=DEVICE, attn_implementation="eager")
