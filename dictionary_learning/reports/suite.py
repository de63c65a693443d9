"""`scae_report`: a saved SCAE suite's CE and per-module FVU / L0 against C, and with its own
connections."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from ..checks import integer
from ..data import text_source
from ..files import atomic_write_json, atomic_write_text
from ..models import DEFAULT_MODEL, load_model
from ..progress import phase
from ..scae import (
    SCAESuite,
    ce_table,
    ce_versus_c,
    evaluate_suite,
    module_table,
    plot_ce_versus_c,
    plot_connection_statistics,
    select_connections,
)


def scae_report(suite: str | Path, model: str | None = None, data: str | None = None,
                Cs: str | list[int] = "1,4,16,64", selection_texts: int = 24, eval_texts: int = 24,
                batch_texts: int = 8, ctx_len: int = 128, out: str | Path | None = None,
                progress: bool = True) -> list[dict[str, Any]]:
    """Select connections on held-out text and print CE (clean, dense suite, pruned suite) against
    C, per-module FVU and L0 at the largest C, and, for a suite saved with connections (fine-tuned),
    the same with those. `Cs`: a list or comma-separated string. With `out`, also writes the tables
    (.md, .json) and plots there.
    `progress`: a line on stderr as each phase starts, bars over the long ones (False: quiet)."""
    if isinstance(Cs, str):
        try:
            Cs = [int(c) for c in Cs.split(",")]
        except ValueError:
            raise ValueError(f"--Cs must be comma-separated integers, got {Cs!r}") from None
    for name, value in (("selection_texts", selection_texts), ("eval_texts", eval_texts),
                        ("batch_texts", batch_texts), ("ctx_len", ctx_len)):
        integer(name, value)
    suite = SCAESuite.load(suite)
    with phase(f"loading {model or suite.model_name or DEFAULT_MODEL} ...", progress):
        lm = load_model(model or suite.model_name or DEFAULT_MODEL, attn_implementation="eager")
    try:
        suite.check_model(lm)
    except ValueError as error:
        raise ValueError(f"{error}: the suite was not trained on "
                         f"{model or suite.model_name or DEFAULT_MODEL}; name its model (--model / "
                         "model=)") from error
    texts = text_source(data, repeat=True)
    selection = list(itertools.islice(texts, selection_texts))
    evaluation = list(itertools.islice(texts, eval_texts))
    kwargs = dict(batch_size=batch_texts, ctx_len=ctx_len)
    with phase(f"selecting connections (C = {max(Cs)}) on {len(selection)} texts ...", progress):
        selected = select_connections(suite, lm, selection, max(Cs), progress=progress, **kwargs)
    with phase(f"CE against C = {', '.join(map(str, Cs))} on {len(evaluation)} texts ...",
               progress):
        rows = ce_versus_c(suite, lm, None, evaluation, Cs, progress=progress,
                           connections=selected, **kwargs)
    report = [ce_table(rows), module_table(rows[-1], f"C = {rows[-1]['C']}")]
    if suite.connections is not None:
        line = f"evaluating the suite's own connections on {len(evaluation)} texts ..."
        with phase(line, progress):
            own = evaluate_suite(suite, lm, evaluation, suite.connections, progress=progress,
                                 **kwargs)
        C = max(i.shape[1] for i in suite.connections.indices.values())
        report.append(f"with the suite's own connections (C = {C}): CE clean "
                      f"{own['ce_clean']:.4f}, dense {own['ce_dense']:.4f}, pruned "
                      f"{own['ce_pruned']:.4f}\n\n" + module_table(own))
    text = "\n\n".join(report) + "\n"
    print(text)
    if out:
        out = Path(out)
        atomic_write_text(out / "ce_versus_c.md", text)
        atomic_write_json(out / "ce_versus_c.json", rows)
        plot_ce_versus_c({"selected on held-out text": rows}, out / "ce_versus_c.png")
        plot_connection_statistics(selected, out / "connections.png")
        print(f"written to {out}/ (ce_versus_c.md, ce_versus_c.json, ce_versus_c.png, "
              "connections.png)")
    return rows
