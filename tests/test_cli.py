"""The command line (`python -m dictionary_learning ...`) on tiny models."""

import pytest

from dictionary_learning import load_model

from .helpers import CTX, make_suite


def test_scae_command(tmp_path, capsys):
    """`python -m dictionary_learning scae` on a saved suite: a C beyond every upstream count gives the dense suite's
    CE, a small C does not, and the suite's own connections (all of them here) give the dense CE too."""
    import json
    import re

    from dictionary_learning.__main__ import main
    from dictionary_learning.scae import all_connections

    model = load_model("tiny-llama", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    suite.model_name = "tiny-llama"
    suite.connections = all_connections(suite, model)
    suite.save(tmp_path / "suite")
    main(["scae", "--suite", str(tmp_path / "suite"), "--Cs", "2,10000", "--selection-texts", "4", "--eval-texts", "4",
          "--batch-texts", "2", "--ctx-len", str(CTX), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "ce_versus_c.json").read_text())
    assert [r["C"] for r in rows] == [2, 10000]
    assert rows[1]["ce_pruned"] == pytest.approx(rows[1]["ce_dense"], abs=1e-4)
    assert rows[0]["ce_pruned"] != pytest.approx(rows[0]["ce_dense"], abs=1e-3)
    own = re.search(r"own connections \(C = 288\): CE clean ([\d.]+), dense ([\d.]+), pruned ([\d.]+)", printed)
    assert own and own.group(2) == own.group(3)
    for name in ("ce_versus_c.png", "connections.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--Cs must be comma-separated integers, got '1,x'"):
        main(["scae", "--suite", str(tmp_path / "suite"), "--Cs", "1,x"])
