"""Sharing through huggingface_hub, against a local folder standing in for the hub."""

import shutil
from pathlib import Path

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoderTopK, BatchTopKSAE
from dictionary_learning.utils import load_dictionary, pull_from_hub, push_to_hub, save_dictionary


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """huggingface_hub's upload and download calls redirected to folders under tmp_path/hub."""
    import huggingface_hub

    root = tmp_path / "hub"
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls["create_repo"] = (repo_id, private)
        (root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, folder_path, repo_id, path_in_repo=None, allow_patterns=None, **kwargs):
        target = root / repo_id / (path_in_repo or "")
        target.mkdir(parents=True, exist_ok=True)
        for pattern in allow_patterns:
            for file in Path(folder_path).glob(pattern):
                shutil.copy(file, target / file.name)
        return f"local://{repo_id}"

    def snapshot_download(repo_id, revision=None, allow_patterns=None, token=None, **kwargs):
        calls["snapshot_download"] = (repo_id, allow_patterns)
        return str(root / repo_id)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return root, calls


@pytest.mark.parametrize("cls,output_dim,skip", [(AutoEncoderTopK, 10, True), (BatchTopKSAE, 10, True),
                                                 (AutoEncoderTopK, 12, False)])
def test_push_and_pull_round_trip(tmp_path, local_hub, cls, output_dim, skip):
    """Transcoders round trip, square ones without a skip too (their weights alone look like an SAE's)."""
    root, calls = local_hub
    torch.manual_seed(0)
    ae = cls(12, 48, 4, output_dim=output_dim, transcoder=True, skip=skip)
    with torch.no_grad():
        ae.b_dec.normal_()
        if skip:
            ae.skip.weight.normal_()
    save_dictionary(ae, tmp_path / "saved", {"trainer": {"lm_name": "tiny-llama", "layer": 1}})
    push_to_hub(tmp_path / "saved", "me/my-sae", path_in_repo="layer_1")
    assert calls["create_repo"] == ("me/my-sae", False)
    assert sorted(p.name for p in (root / "me/my-sae/layer_1").iterdir()) == ["ae.pt", "config.json",
                                                                            "model.safetensors"]
    pulled, config = pull_from_hub("me/my-sae", subfolder="layer_1")
    assert calls["snapshot_download"] == ("me/my-sae", ["layer_1/*"])
    assert config["trainer"]["lm_name"] == "tiny-llama" and config["trainer"]["dict_class"] == cls.__name__
    x = torch.randn(6, 12)
    torch.testing.assert_close(pulled(x), ae(x))
    assert isinstance(pulled, cls) and pulled.transcoder and (pulled.skip is not None) == skip


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="expected a folder with config.json"):
        load_dictionary(tmp_path)
    with pytest.raises(ValueError, match="not a saved dictionary"):
        push_to_hub(tmp_path, "me/x")
