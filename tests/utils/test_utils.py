"""Sharing through huggingface_hub, against a local folder standing in for the hub."""

import shutil
from pathlib import Path

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoderTopK, BatchTopKSAE
from dictionary_learning.scae import SCAESuite, all_connections
from dictionary_learning.utils import load_dictionary, pull_from_hub, push_to_hub, save_dictionary


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """huggingface_hub's upload and download calls redirected to folders under tmp_path/hub."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    root = tmp_path / "hub"
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls["create_repo"] = (repo_id, private)
        (root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, folder_path, repo_id, path_in_repo=None, allow_patterns=None, **kwargs):
        # the files huggingface_hub's own filter selects (its patterns match paths relative to the
        # folder)
        target = root / repo_id / (path_in_repo or "")
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*")
                 if p.is_file()]
        for relative in filter_repo_objects(files, allow_patterns=allow_patterns):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(folder_path) / relative, target / relative)
        return f"local://{repo_id}"

    def snapshot_download(repo_id, revision=None, allow_patterns=None, token=None, **kwargs):
        calls["snapshot_download"] = (repo_id, allow_patterns)
        return str(root / repo_id)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return root, calls


@pytest.mark.parametrize("cls,output_dim,skip",
                         [(AutoEncoderTopK, 10, True), (BatchTopKSAE, 10, True),
                          (AutoEncoderTopK, 12, False)])
def test_push_and_pull_round_trip(tmp_path, local_hub, cls, output_dim, skip):
    """Transcoders round trip, square ones without a skip too (their weights alone look like an
    SAE's)."""
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
    assert sorted(p.name for p in (root / "me/my-sae/layer_1").iterdir()) == ["ae.pt",
                                                                              "config.json",
                                                                            "model.safetensors"]
    pulled, config = pull_from_hub("me/my-sae", subfolder="layer_1")
    assert calls["snapshot_download"] == ("me/my-sae", ["layer_1/*"])
    assert (config["trainer"]["lm_name"] == "tiny-llama"
            and config["trainer"]["dict_class"] == cls.__name__)
    x = torch.randn(6, 12)
    torch.testing.assert_close(pulled(x), ae(x))
    assert isinstance(pulled, cls) and pulled.transcoder and (pulled.skip is not None) == skip


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="expected a folder with config.json"):
        load_dictionary(tmp_path)
    with pytest.raises(ValueError, match="not a saved dictionary .* or SCAE suite"):
        push_to_hub(tmp_path, "me/x")


def test_suite_push_and_pull_round_trip(tmp_path, local_hub, tiny_llama):
    """An SCAE suite goes up as one folder (modules, connections, suite.json; not a checkpoint lying
    beside them) and comes back equal, connections included."""
    root, calls = local_hub
    suite = SCAESuite.random(tiny_llama, d_sae=32, k=4, n_layer=2, seed=1)
    suite.model_name = "tiny-llama"
    suite.connections = all_connections(suite, tiny_llama).top(3)
    suite.push_to_hub("me/suite", path_in_repo="v1")
    uploaded = sorted(p.relative_to(root / "me/suite/v1").as_posix()
                      for p in (root / "me/suite/v1").rglob("*")
                      if p.is_file())
    assert uploaded == sorted(["connections.safetensors", "suite.json", *(
        f"{name}/{file}" for name in suite.names
        for file in ("ae.pt", "config.json", "model.safetensors"))])
    pulled = SCAESuite.from_hub("me/suite", subfolder="v1")
    assert calls["snapshot_download"] == ("me/suite", ["v1/*"])
    assert pulled.names == suite.names and pulled.model_name == "tiny-llama"
    for name in suite.names:
        for key, value in suite[name].state_dict().items():
            assert torch.equal(pulled[name].state_dict()[key], value), (name, key)
        assert torch.equal(pulled.connections.indices[name], suite.connections.indices[name])
        assert torch.equal(pulled.connections.weights[name], suite.connections.weights[name])
    # a saved suite folder pushes the same way, without what is not part of the suite
    suite.save(tmp_path / "saved")
    (tmp_path / "saved" / "checkpoint.pt").write_bytes(b"not uploaded")
    push_to_hub(tmp_path / "saved", "me/suite2")
    assert ((root / "me/suite2/suite.json").exists()
            and not (root / "me/suite2/checkpoint.pt").exists())
    assert SCAESuite.from_hub("me/suite2").names == suite.names


def test_saved_files_get_the_permissions_of_a_plain_new_file(tmp_path):
    """Every file of a save has the mode `open` gives under the umask (safetensors alone would write
    0600), and a file that is replaced keeps its own mode."""
    import os
    import stat

    from dictionary_learning.files import atomic_write_text

    (tmp_path / "plain").write_text("")  # what this process's umask gives a new file
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    folder = save_dictionary(AutoEncoderTopK(8, 16, 2), tmp_path / "sae")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes) >= {"ae.pt", "model.safetensors", "config.json"}
    assert set(modes.values()) == {plain}, modes
    os.chmod(tmp_path / "plain", 0o600)
    atomic_write_text(tmp_path / "plain", "replaced")
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o600
