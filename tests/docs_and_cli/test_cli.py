"""The command line (`python -m dictionary_learning ...`) on tiny models."""

import os
import subprocess
import sys

import pytest

from dictionary_learning import load_model

from ..helpers import CTX, make_suite


def test_scae_command(tmp_path, capsys):
    """`python -m dictionary_learning scae` on a saved suite: a C beyond every source count gives
    the dense suite's CE, a small C does not, and the suite's own connections (all of them here)
    give the dense CE too."""
    import json
    import re

    from dictionary_learning.__main__ import main
    from dictionary_learning.scae import all_connections

    model = load_model("tiny-llama", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    suite.model_name = "tiny-llama"
    suite.connections = all_connections(suite, model)
    suite.save(tmp_path / "suite")
    main(["scae", "--suite", str(tmp_path / "suite"), "--Cs", "2,10000", "--selection-texts", "4",
          "--eval-texts", "4", "--batch-texts", "2", "--ctx-len", str(CTX), "--out",
          str(tmp_path / "out")])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "ce_versus_c.json").read_text())
    assert [r["C"] for r in rows] == [2, 10000]
    assert rows[1]["ce_pruned"] == pytest.approx(rows[1]["ce_dense"], abs=1e-4)
    assert rows[0]["ce_pruned"] != pytest.approx(rows[0]["ce_dense"], abs=1e-3)
    own = re.search(r"own connections \(C = 288\): CE clean ([\d.]+), dense ([\d.]+), pruned "
                    r"([\d.]+)", printed)
    assert own and own.group(2) == own.group(3)
    for name in ("ce_versus_c.png", "connections.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--Cs must be comma-separated integers, got '1,x'"):
        main(["scae", "--suite", str(tmp_path / "suite"), "--Cs", "1,x"])


PROG = "python -m dictionary_learning"


def run_cli(*args, cwd, **env):
    """`python -m dictionary_learning ARGS` in a subprocess (offline, as conftest sets it)."""
    command = [sys.executable, "-m", "dictionary_learning", *map(str, args)]
    return subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory):
    """A tiny TopK SAE folder whose config names no model or hook point."""
    from dictionary_learning.dictionary import AutoEncoderTopK
    from dictionary_learning.utils import save_dictionary

    return save_dictionary(AutoEncoderTopK(16, 32, 4), tmp_path_factory.mktemp("saved") / "sae")


REFUSED = {  # command line (SAE: the saved SAE, TMP: the test's folder) -> what its error line says
    "export-sae-to-circuit-tracer": (["export", "--to", "circuit-tracer", "SAE", "TMP/ct"],
                                     "transcoder set"),
    "export-without-hookpoint": (["export", "--to", "sparsify", "SAE", "TMP/sp"],
                                 "pass --hookpoint (e.g."),
    "import-empty-folder": (["import", "TMP", "TMP/out"], "holds none of the formats"),
    "train-missing-layer": (["train", "--model", "tiny-gpt2", "--layer", "99", "--out", "TMP/q"],
                            "layer must be an int in [0, 3]"),
    "collect-bad-layers": (["collect", "--model", "tiny-gpt2", "--layers", "x,y"],
                           "comma-separated integers"),
    "dashboard-missing-folder": (["dashboard", "--dictionary", "TMP/missing"],
                                 "expected a folder with config.json"),
    "dashboard-renamed-flag": (["dashboard", "--dictionary", "SAE", "--upstream", "SAE"],
                               "--upstream was renamed --source"),
    "train-negative-norm-multiple": (["train", "--max-norm-multiple", "-3", "--out", "TMP/q"],
                                     "expected a positive number or off, got '-3'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_inputs_end_in_one_error_line(case, saved_sae, tmp_path):
    """Every refusal is argparse-style: `PROG COMMAND: error: ...` as stderr's last line, exit 2,
    no traceback, nothing written; a keyword the pipeline names (`hookpoint=`) reads as a flag."""
    args, message = REFUSED[case]
    args = [str(saved_sae) if a == "SAE" else a.replace("TMP", str(tmp_path)) for a in args]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{PROG} {args[0]}: error: "), last
    assert message in last
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_traceback_on_request(tmp_path):
    """DICTIONARY_LEARNING_TRACEBACK=1 shows the refusal's traceback (for developers); main(argv)
    raises it too, unless exit_on_error."""
    from dictionary_learning.__main__ import main

    result = run_cli("import", tmp_path, tmp_path / "out", cwd=tmp_path,
                     DICTIONARY_LEARNING_TRACEBACK="1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: " in result.stderr
    with pytest.raises(ValueError, match="holds none of the formats"):
        main(["import", str(tmp_path), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exited:
        main(["import", str(tmp_path), str(tmp_path / "out")], exit_on_error=True)
    assert exited.value.code == 2


def test_keywords_read_as_flags():
    """Only a keyword the command has as an option, followed by no value, becomes its flag; one
    whose flag the message names already is left alone."""
    from dictionary_learning.__main__ import flag_names, parser

    export = parser().parse_args(["export", "--to", "sparsify", "SRC", "DST"]).command_parser
    flagged = flag_names("pass model_name= (e.g.\n a hub id)", export)
    assert flagged == "pass --model-name (e.g. a hub id)"
    assert flag_names("pass hookpoint=", export) == "pass --hookpoint"
    assert flag_names("(hook_name= / --hook-name)", export) == "(hook_name= / --hook-name)"
    assert flag_names("got hookpoint='x', layer= here", export) == "got hookpoint='x', layer= here"


def test_norm_filter_flag():
    """train and collect filter outlier tokens at 10x the median unless told otherwise."""
    from dictionary_learning.__main__ import parser

    for command in ("train", "collect"):
        parse = parser().parse_args
        assert parse([command]).max_activation_norm_multiple == 10.0
        assert parse([command, "--max-norm-multiple", "off"]).max_activation_norm_multiple is None
        assert parse([command, "--max-norm-multiple", "4.5"]).max_activation_norm_multiple == 4.5
