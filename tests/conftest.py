import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail at once, not retry for ~46 s
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

from dictionary_learning import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return load_model("tiny-gpt2")


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2):
    return {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}[request.param]


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def eager_model(request):
    """A tiny model whose attention modules return their patterns (as SCAE needs); one per test module, since
    SCAE fine-tuning freezes the model's parameters."""
    return load_model(request.param, attn_implementation="eager")
