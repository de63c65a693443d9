"""Suite metrics: next-token CE of the clean model, the dense suite and the pruned suite
(`evaluate_suite`; against C: `ce_versus_c`), per-module FVU and L0, and their tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checks import texts as check_texts
from ..files import pyplot, save_figure
from ..progress import progress_bar
from ..tracing import masked_cross_entropy, tokenize
from .pruned import pruned_forward
from .selection import connections_from_statistics, contribution_statistics
from .suite import Connections, SCAESuite, check_C
from .tracing import clean_targets, patched_logits, run_suite


class SuiteMetrics:
    """Token-weighted sums over evaluation batches: CE of the clean model, the dense suite and each
    set of pruned connections, and per module the squared error against the clean model's attention
    / MLP output and the L0."""

    def __init__(self) -> None:
        self.ce: dict[str, float] = {}
        self.ce_tokens = 0
        self.tokens = 0
        self.error: dict[tuple[str, str], float] = {}
        self.l0: dict[tuple[str, str], float] = {}
        self.target_sum: dict[str, torch.Tensor] = {}
        self.target_square: dict[str, float] = {}

    @torch.no_grad()
    def add(self, suite: SCAESuite, model: Any, texts: list[str],
            connection_sets: dict[str, Connections], ctx_len: int) -> None:
        encoding = tokenize(model.tokenizer, texts, ctx_len)
        record, dense_logits = run_suite(suite, model, encoding)
        saved = clean_targets(suite, model, encoding, logits=True)
        logits, codes = {"clean": saved["logits"], "dense": dense_logits}, {"dense": record.codes}
        for label, connections in connection_sets.items():
            codes[label] = pruned_forward(suite, model, record, connections)
            logits[label] = patched_logits(suite, model, encoding, codes[label])
        for label, value in logits.items():
            ce, mask = masked_cross_entropy(value, encoding["input_ids"],
                                            encoding["attention_mask"])
            self.ce[label] = self.ce.get(label, 0.0) + ce[mask].sum().item()
        self.ce_tokens += int(mask.sum())
        mask = record.mask
        self.tokens += int(mask.sum())
        for name in suite.names:
            target = saved[name][mask]
            self.target_sum[name] = self.target_sum.get(name, 0) + target.sum(0)
            self.target_square[name] = (self.target_square.get(name, 0.0)
                                        + target.pow(2).sum().item())
            for label, module_codes in codes.items():
                active = module_codes[name][mask]
                error = (suite[name].decode(active) - target).pow(2).sum().item()
                self.error[label, name] = self.error.get((label, name), 0.0) + error
                self.l0[label, name] = self.l0.get((label, name), 0.0) + (active > 0).sum().item()

    def result(self, label: str, key: str = "pruned") -> dict[str, Any]:
        """CE of the clean model, the dense suite and connection set `label` (as `ce_<key>`), and
        per module the FVU and L0 of the dense and the pruned codes."""
        result: dict[str, Any] = {"ce_clean": self.ce["clean"] / self.ce_tokens,
                                  "ce_dense": self.ce["dense"] / self.ce_tokens}
        if label in self.ce:
            result[f"ce_{key}"] = self.ce[label] / self.ce_tokens
        modules = {}
        for name, total in self.target_sum.items():
            variance = max(self.target_square[name] - total.pow(2).sum().item() / self.tokens,
                           1e-12)
            modules[name] = {f"{metric}_{out}": value
                             for source, out in (("dense", "dense"), (label, key))
                             if (source, name) in self.error
                             for metric, value in (("fvu", self.error[source, name] / variance),
                                                   ("l0", self.l0[source, name] / self.tokens))}
        result["modules"] = modules
        return result


@torch.no_grad()
def evaluate_suite(suite: SCAESuite, model: Any, texts: list[str],
                   connections: Connections | None = None, batch_size: int = 8, ctx_len: int = 128,
                   progress: bool = True
                   ) -> dict[str, Any]:
    """Next-token CE (mean over real tokens) of the clean model, with the dense suite patched in
    (every attention output and MLP output replaced by its module's reconstruction) and, given
    connections, with the pruned suite patched in; and under "modules", per module, the FVU of its
    reconstruction against the clean model's attention / MLP output and its L0, for the dense and
    the pruned codes.
    progress: a bar on stderr when this takes more than a few seconds (`progress.DELAY`)."""
    texts = list(check_texts("texts", texts))
    if not texts:
        raise ValueError("evaluate_suite needs at least one text, got none")
    metrics = SuiteMetrics()
    sets = {"pruned": connections} if connections is not None else {}
    desc = f"evaluating suite on {len(texts)} texts"
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=desc, enabled=progress, unit="batch"):
        metrics.add(suite, model, texts[start : start + batch_size], sets, ctx_len)
    return metrics.result("pruned")


def suite_cross_entropy(suite: SCAESuite, model: Any, texts: list[str],
                        connections: Connections | None = None, ctx_len: int = 128,
                        batch_size: int = 8, progress: bool = True
                        ) -> dict[str, float]:
    """`ce_clean`, `ce_dense` and (given connections) `ce_pruned` of `evaluate_suite`."""
    result = evaluate_suite(suite, model, texts, connections, batch_size=batch_size,
                            ctx_len=ctx_len, progress=progress)
    return {key: value for key, value in result.items() if key.startswith("ce_")}



@torch.no_grad()
def ce_versus_c(suite: SCAESuite, model: Any, selection_texts: list[str] | None,
                eval_texts: list[str], Cs: list[int], batch_size: int = 8, ctx_len: int = 128,
                progress: bool = True,
                connections: Connections | None = None) -> list[dict[str, Any]]:
    """Select connections on `selection_texts` (once, at the largest C: the top C for a smaller C
    are its first C; or pass `connections` already selected, or drawn by `random_connections`, at
    the largest C or more) and measure, on `eval_texts`, CE of the clean model, the dense suite and
    the suite pruned to each C (C larger than a module's source count keeps them all, which is the
    dense suite), with per-module FVU and L0. One row per C.
    progress: bars on stderr over the phases that take more than a few seconds (progress.DELAY)."""
    if not Cs:
        raise ValueError("Cs must list at least one C")
    for C in Cs:
        check_C(C)
    if connections is None:
        statistics = contribution_statistics(suite, model, selection_texts, batch_size=batch_size,
                                             ctx_len=ctx_len, progress=progress)
        connections = connections_from_statistics(suite, model, statistics, max(Cs),
                                                  progress=progress)
    elif connections.scores is None and not connections.random:
        raise ValueError("ce_versus_c needs selected connections (strongest first, with scores: "
                         "select_connections) or random ones (random_connections)")
    for name in suite.names:
        needed = min(max(Cs), suite.n_sources(name, model))
        if connections.indices[name].shape[1] < needed:
            raise ValueError(f"{name}: C = {max(Cs)} needs {needed} connections per feature, the "
                             f"connections given have {connections.indices[name].shape[1]}")
    sets = {str(C): connections.top(C) for C in Cs}
    metrics = SuiteMetrics()
    desc = f"CE against C ({len(Cs)} values) on {len(eval_texts)} texts"
    starts = range(0, len(eval_texts), batch_size)
    for start in progress_bar(starts, desc=desc, enabled=progress, unit="batch"):
        metrics.add(suite, model, eval_texts[start : start + batch_size], sets, ctx_len)
    return [{"C": C, **metrics.result(str(C))} for C in Cs]


def ce_table(rows: list[dict[str, Any]], label: str = "") -> str:
    """A markdown table of ce_versus_c rows (with the pruned suite's FVU averaged over modules)."""
    lines = [f"| C | CE clean | CE dense suite | CE pruned suite{' ' + label if label else ''} | "
             "mean FVU pruned |",
             "|---|---|---|---|---|"]
    for r in rows:
        fvu = sum(m["fvu_pruned"] for m in r["modules"].values()) / len(r["modules"])
        lines.append(f"| {r['C']} | {r['ce_clean']:.4f} | {r['ce_dense']:.4f} | "
                     f"{r['ce_pruned']:.4f} | {fvu:.3f} |")
    return "\n".join(lines)


def module_table(result: dict[str, Any], label: str = "") -> str:
    """A markdown table of the per-module FVU and L0 in an `evaluate_suite` result or a
    `ce_versus_c` row."""
    lines = [f"| module{' (' + label + ')' if label else ''} | FVU dense | FVU pruned | L0 dense | "
             "L0 pruned |",
             "|---|---|---|---|---|"]
    for name, m in result["modules"].items():
        lines.append(f"| {name} | {m['fvu_dense']:.3f} | {m.get('fvu_pruned', float('nan')):.3f} | "
                     f"{m['l0_dense']:.1f} | {m.get('l0_pruned', float('nan')):.1f} |")
    return "\n".join(lines)


def plot_ce_versus_c(curves: dict[str, list[dict[str, float]]], path: str | Path) -> None:
    """CE of the pruned suite against C (log scale) for each labelled curve, with the clean CE and,
    for a curve measured on one suite (one dense CE over its rows; not one fine-tuned per C), the
    dense suite's CE."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(9, 4))
    dense_drawn: set[float] = set()  # curves on the same suite share one dense line
    for label, rows in curves.items():
        line, = axis.plot([r["C"] for r in rows], [r["ce_pruned"] for r in rows], marker="o",
                          label=f"pruned, {label}")
        dense = {r["ce_dense"] for r in rows}
        if len(dense) == 1 and rows[0]["ce_dense"] not in dense_drawn:
            dense_drawn.add(rows[0]["ce_dense"])
            axis.axhline(rows[0]["ce_dense"], color=line.get_color(), linestyle=":",
                         label=f"dense suite, {label}")
    first = next(iter(curves.values()))
    axis.axhline(first[0]["ce_clean"], color="black", linestyle="--", label="clean model")
    axis.set_xscale("log")
    Cs = sorted({r["C"] for rows in curves.values() for r in rows})
    axis.set_xticks(Cs, [f"{C:,}" for C in Cs])
    axis.minorticks_off()
    axis.set_xlabel("C (source connections per feature)")
    axis.set_ylabel("next-token CE (nats)")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    save_figure(figure, path)


@torch.no_grad()
def plot_connection_statistics(connections: Connections, path: str | Path) -> dict[str, float]:
    """Two histograms as a PNG: |mean contribution| of kept connections, and the share of each
    feature's total |mean contribution| its C connections capture. Returns the median share."""
    plt = pyplot()

    if connections.scores is None or connections.totals is None:
        raise ValueError("these connections carry no scores: make them with select_connections or "
                         "connections_from_statistics")
    kept, shares = [], []
    for name, chosen in connections.scores.items():
        if chosen.shape[1] == 0:
            continue
        kept.append(chosen.flatten())
        shares.append(chosen.sum(1) / connections.totals[name].clamp_min(1e-12))
    kept, shares = torch.cat(kept), torch.cat(shares)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.hist(kept.clamp_min(1e-12).log10().numpy(), bins=50)
    left.set_xlabel("log10 |mean contribution| of kept connections")
    left.set_ylabel("connections")
    right.hist(shares.numpy(), bins=40, range=(0, 1))
    right.set_xlabel("share of a feature's total |mean contribution| kept")
    right.set_ylabel("features")
    C = max(i.shape[1] for i in connections.indices.values())
    figure.suptitle(f"connections at C = {C}")
    figure.tight_layout()
    save_figure(figure, path)
    return {"median_share_kept": shares.median().item()}

