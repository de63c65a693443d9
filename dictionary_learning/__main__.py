"""Command line: `python -m dictionary_learning <command> --help`.

train      the quickstart: a TopK SAE on SmolLM2's middle layer on the offline corpus, then a
           report folder with a feature dashboard
collect    read activations out of a model at hook points, print their statistics, save them
           (file or cache)
scae       evaluate a saved SCAE suite: CE and per-module FVU / L0 against C, and with its own
           connections
circuit    a sparse feature circuit over saved dictionaries: node and edge effects on prompt
           pairs, faithfulness against the threshold, the graph
dashboard  an offline HTML feature dashboard of a saved dictionary, and circuit-tracer feature
           files
export     a saved dictionary in SAELens', sparsify's or circuit-tracer's format
import     a SAELens, sparsify or circuit-tracer folder as this toolkit's ae.pt + config.json
           folder(s)

Each command parses its arguments and calls one pipeline (in `reports`, `dashboard` or `formats`),
whose options dataclass (`reports.QuickstartConfig`, `reports.CollectConfig`,
`dashboard.DashboardCommandConfig`), or else whose signature, holds the defaults.

A refused input (a missing folder, a layer the model lacks, a folder in no known format) ends with
one `... error: <why>` line and exit status 2; DICTIONARY_LEARNING_TRACEBACK=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
from typing import Any, Callable

from . import dashboard, formats, reports
from .circuits import AGREEMENT_CASES
from .files import FolderInUse
from .models import DTYPES, SITES

# what a pipeline raises when it refuses its input: reported as a usage error (others are bugs)
REFUSALS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError,
            FolderInUse, FloatingPointError)
TRACEBACK_VARIABLE = "DICTIONARY_LEARNING_TRACEBACK"

DATA_HELP = ("text: python-docs (default, offline), a .txt/.jsonl file or folder, or a hub dataset "
             "id[:split]")


def norm_multiple(text: str) -> float | None:
    """--max-norm-multiple: a positive number, or off."""
    if text.lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number or off, got {text!r}")
    return value


def count(text: str) -> int:
    """argparse type: a positive integer (a usage error names the option otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class Renamed(argparse.Action):
    """A flag that was renamed: given (with or without a value), a usage error naming the new one
    (`new`)."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?",
                         default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error(f"{option_string} was renamed {self.new}")


def _command(commands: Any, name: str, pipeline: Callable, help: str, config: type | None = None
             ) -> argparse.ArgumentParser:
    """A subcommand whose defaults are those of `pipeline`'s options dataclass `config` (else of
    its signature)."""
    parser = commands.add_parser(name, help=help, description=help)
    if config is not None:
        defaults = {field.name: field.default for field in dataclasses.fields(config)}
    else:
        defaults = {key: p.default for key, p in inspect.signature(pipeline).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    parser.set_defaults(run=pipeline, command_parser=parser, **defaults)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="smollm2-135m (default, offline), tiny-llama, tiny-gpt2, a "
                        "local directory or a hub id")
    parser.add_argument("--layer", type=int, help="layer (default: the middle one)")
    parser.add_argument("--site", choices=SITES, help="default %(default)s")
    parser.add_argument("--data", help=DATA_HELP)
    parser.add_argument("--dtype", choices=["auto", *DTYPES],
                        help="model and activation dtype; auto (default): bfloat16 where the "
                        "hardware is fast at it, else float32")
    parser.add_argument("--device", help="default %(default)s")
    parser.add_argument("--ctx-len", type=count, help="tokens per context (default 128; train "
                        "--cache: the cache's)")
    parser.add_argument("--remove-bos", action=argparse.BooleanOptionalAction,
                        help="drop each context's first token (BOS or attention sink; default: "
                             "drop)")
    parser.add_argument("--max-norm-multiple", dest="max_activation_norm_multiple",
                        type=norm_multiple,
                        help="drop from the training activations the tokens whose norm exceeds "
                             "this multiple of their batch's median (default %(default)s; off: "
                             "keep every token)")


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="python -m dictionary_learning", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main_parser.add_subparsers(dest="command", required=True)

    p = _command(commands, "train", reports.quickstart,
                 "the quickstart: train a TopK SAE, evaluate it, write a report",
                 reports.QuickstartConfig)
    _add_model_arguments(p)
    p.add_argument("--tokens", type=count,
                   help="training activations to collect (once; default %(default)s)")
    p.add_argument("--steps", type=count,
                   help="training steps (epochs over the collected tokens; default %(default)s)")
    p.add_argument("--batch", type=count, help="activations per training step (default "
                                               "%(default)s)")
    p.add_argument("--dict-size", "--d-sae", dest="d_sae", type=count,
                   help="the SAE's features (default %(default)s)")
    p.add_argument("--k", type=count, help="default %(default)s")
    p.add_argument("--lr", type=float, help="default %(default)s")
    p.add_argument("--dead-tokens", type=count, help="tokens without firing before a latent counts "
                   "as dead for AuxK (default %(default)s)")
    p.add_argument("--batch-texts", type=count, help="texts per forward pass (default %(default)s)")
    p.add_argument("--eval-texts", type=count,
                   help="held-out texts (the first of the corpus; default %(default)s)")
    p.add_argument("--eval-tokens", type=count, help="default %(default)s")
    p.add_argument("--loss-batches", type=count,
                   help="batches of 16 held-out texts for loss_recovered (default %(default)s)")
    p.add_argument("--n-features", type=int,
                   help="features shown in top_contexts.txt (default %(default)s)")
    p.add_argument("--seed", type=int, help="default %(default)s")
    p.add_argument("--encoder-dtype", choices=["auto", "float32", "bfloat16"],
                   help="the SAE's encoder GEMM while training; auto (default): bfloat16 where the "
                   "hardware is fast at it (weights and Adam stay float32)")
    p.add_argument("--wandb", action="store_true",
                   help="log to wandb ($WANDB_MODE, default offline)")
    p.add_argument("--dashboard-features", type=int, help="features in the report's "
                   "dashboard/index.html (the first N; 0: no dashboard; default %(default)s)")
    p.add_argument("--dashboard-tokens", type=count,
                   help="held-out tokens the dashboard reads (default %(default)s)")
    p.add_argument("--out", help="report folder (default %(default)s)")
    p.add_argument("--cache", help="train on this activation cache folder (written by `collect "
                   "--out DIR`) instead of collecting --tokens; held-out texts follow those the "
                   "cache read")

    p = _command(commands, "collect", reports.collect,
                 "collect activations and print their statistics",
                 reports.CollectConfig)
    _add_model_arguments(p)
    p.add_argument("--tokens", type=count,
                   help="how many token vectors to collect (default %(default)s)")
    p.add_argument("--batch", type=count, help="texts per forward pass (default %(default)s)")
    p.add_argument("--layers", help="comma-separated layers, e.g. 0,1,2 (instead of --layer): "
                   "every layer at every site, read in one model pass; named like layers.1.mlp_out")
    p.add_argument("--sites",
                   help=f"comma-separated sites among {','.join(SITES)} (instead of --site)")
    p.add_argument("--shard-tokens", type=count,
                   help="rows per shard of a cache folder (default %(default)s)")
    p.add_argument("--out", help="FILE.safetensors: save the activations in one file; any other "
                   "path: a cache folder of safetensors shards and manifest.json (read it with "
                   "ActivationCache; rerunning the same command continues an interrupted one, a "
                   "larger --tokens extends it)")

    p = _command(commands, "scae", reports.scae_report,
                 "evaluate a saved SCAE suite: CE and FVU against C")
    p.add_argument("--suite", required=True, help="a folder written by SCAESuite.save "
                   "(train_scae_suite writes save_dir/suite)")
    p.add_argument("--model", help="default: the suite's model_name, else smollm2-135m")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--Cs", help="comma-separated connections per feature (default %(default)s)")
    p.add_argument("--selection-texts", type=count,
                   help="texts to select connections on (the first; default %(default)s)")
    p.add_argument("--eval-texts", type=count,
                   help="texts to measure CE on (the next ones; default %(default)s)")
    p.add_argument("--batch-texts", type=count, help="default %(default)s")
    p.add_argument("--ctx-len", type=count, help="default %(default)s")
    p.add_argument("--out", help="also write the tables and plots to this folder")

    p = _command(commands, "circuit", reports.circuit_report,
                 "a sparse feature circuit over saved dictionaries (Marks et al. 2024): node and "
                 "edge effects on prompt pairs, faithfulness and completeness, the graph")
    p.add_argument("dictionaries", nargs="*", metavar="DICTIONARY",
                   help="saved dictionary folders (ae.pt + config.json), placed at the hook points "
                   "their config.json names")
    p.add_argument("--suite", help="a saved SCAE suite folder (SCAESuite.save) instead of "
                   "dictionaries: the circuit of its replacement model with its exact connection "
                   "edges, and their agreement with the attribution edges")
    p.add_argument("--model", help="default: the lm_name of the first config.json")
    p.add_argument("--case", choices=AGREEMENT_CASES,
                   help="subject-verb agreement prompts of this kind (default %(default)s)")
    p.add_argument("--prompts", help="a JSONL file of prompt pairs in the paper's format "
                   "(clean_prefix, patch_prefix, clean_answer, patch_answer) instead of --case")
    p.add_argument("--pairs", type=count, help="prompt pairs (default %(default)s)")
    p.add_argument("--method", choices=["ig", "attribution"], help="default %(default)s")
    p.add_argument("--steps", type=count, help="integrated-gradient steps (default %(default)s)")
    p.add_argument("--thresholds", help="node thresholds as fractions of the largest node effect "
                   "(default %(default)s)")
    p.add_argument("--graph-threshold", type=float,
                   help="the drawn circuit's threshold, a fraction (default %(default)s)")
    p.add_argument("--edges", action=argparse.BooleanOptionalAction,
                   help="compute edges (default: yes)")
    p.add_argument("--label-texts", type=int, help="label the graph's features by their top "
                   "activating tokens on this many offline-corpus texts (0: no; default "
                   "%(default)s)")
    p.add_argument("--dashboards", help="comma-separated SITE=PAGE: the dashboard page (index.html "
                   "from `dashboard`) of a site's dictionary, which its nodes in circuit.svg link "
                   "to, e.g. layers.3.resid=reports/dash3/index.html")
    p.add_argument("--out", help="report folder (default %(default)s)")

    p = _command(commands, "export", formats.export_command,
                 "write a saved dictionary in another library's format (SAELens, sparsify, "
                 "circuit-tracer)")
    p.add_argument("--to", required=True, choices=formats.FORMATS)
    p.add_argument("paths", nargs="+", metavar="PATH", help="SRC [SRC ...] DST: the saved "
                   "dictionary folder, then where to write; circuit-tracer: one transcoder folder "
                   "per layer in layer order, or one folder holding them")
    p.add_argument("--hook-name", help="SAELens: the module whose output the dictionary reads "
                   "(default: from the saved hook points)")
    p.add_argument("--hook-name-out", help="SAELens transcoders: the module whose output it writes")
    p.add_argument("--hookpoint",
                   help="sparsify: the hookpoint folder name (default: from the saved hook points)")
    p.add_argument("--model-name",
                   help="circuit-tracer: the model's hub id (default: from the saved config)")
    p.add_argument("--topk", action="store_true", help="circuit-tracer: write TopK transcoders as "
                   "`activation: topk` (read by circuit-tracer builds newer than 0.5.0, refused "
                   "otherwise)")

    p = _command(commands, "import", formats.import_command,
                 "save a SAELens, sparsify or circuit-tracer folder as this toolkit's dictionary "
                 "folder(s)")
    p.add_argument("source", metavar="SRC")
    p.add_argument("out", metavar="DST")
    p.add_argument("--from", dest="format", choices=formats.FORMATS,
                   help="default: detected from the files")
    p.add_argument("--hookpoint", help="sparsify: which hookpoint of a run folder holding several")
    p.add_argument("--model-name", help="the model (places sparsify hookpoints and circuit-tracer "
                   "layers in its module tree; default: from the folder)")

    p = _command(commands, "dashboard", dashboard.dashboard,
                 "write an offline HTML feature dashboard of a saved dictionary (one "
                 "self-contained index.html) and circuit-tracer feature "
                 "files", dashboard.DashboardCommandConfig)
    p.add_argument("--dictionary", required=True, help="a saved dictionary folder (ae.pt + "
                   "config.json), or a module folder of a saved SCAE suite (SUITE/mlp_3)")
    p.add_argument("--model", help="default: the one config.json names, else smollm2-135m")
    p.add_argument("--layer", type=int,
                   help="the layer the dictionary reads (default: as config.json says)")
    p.add_argument("--site", choices=SITES, help="the site it reads (default: as config.json says; "
                   "a transcoder's input side, e.g. mlp_in)")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--dtype", choices=["auto", *DTYPES], help="model dtype (default %(default)s)")
    p.add_argument("--device", help="default %(default)s")
    p.add_argument("--ctx-len", type=count,
                   help="tokens per text (default: the training buffer's, else 128)")
    p.add_argument("--remove-bos", action=argparse.BooleanOptionalAction,
                   help="leave each context's first token out (default: as the training buffer "
                        "did)")
    p.add_argument("--features", help="a count (the first N), 'all', or indices and ranges such as "
                   "0-99,512 (default %(default)s)")
    p.add_argument("--tokens", type=count, help="tokens to read (default %(default)s)")
    p.add_argument("--texts", type=count,
                   help="at most this many texts (default: as many as --tokens needs)")
    p.add_argument("--batch-texts", type=count, help="texts per forward pass (default %(default)s)")
    p.add_argument("--top-examples", type=count,
                   help="top activating contexts per feature (default %(default)s)")
    p.add_argument("--source", help="an earlier dictionary whose decoder writes what this one "
                   "reads: show each feature's strongest virtual weights W_enc . W_dec(source)^T")
    p.add_argument("--upstream", action=Renamed, new="--source")
    p.add_argument("--seed", type=int, help="default %(default)s")
    p.add_argument("--out", help="output folder (default %(default)s)")
    p.add_argument("--other-model", action="store_true", help="read the dictionary on --model even "
                   "though its config records another model (by its weights' fingerprint)")
    return main_parser


def flag_names(message: str, command_parser: argparse.ArgumentParser) -> str:
    """The message on one line, a keyword such as `hookpoint=` named as its flag (`--hookpoint`).

    Pipelines word their refusals for Python callers; the map comes from the command's own options,
    so it holds for every command. A keyword whose flag the message names already is left alone.
    """
    message = " ".join(message.split())
    for action in command_parser._actions:
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if flags and flags[0] not in message:
            keyword = re.compile(rf"(?<![\w-]){re.escape(action.dest)}=(?=\s|$|[),;/])")
            message = keyword.sub(flags[0], message)
    return message


def main(argv: list[str] | None = None, *, exit_on_error: bool | None = None) -> Any:
    """Parse the command line and run its pipeline.

    exit_on_error: report a refused input (REFUSALS) as `prog: error: message` and exit 2, as
    argparse does with its own checks, instead of raising it. Default: on the real command line
    (argv None), not for a caller that passes argv. DICTIONARY_LEARNING_TRACEBACK=1 always raises.
    """
    args = vars(parser().parse_args(argv))
    pipeline = args.pop("run")
    command_parser = args.pop("command_parser")
    args.pop("command")
    if exit_on_error is None:
        exit_on_error = argv is None
    try:
        return pipeline(**args)
    except REFUSALS as error:
        if not exit_on_error or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        message = flag_names(str(error) or type(error).__name__, command_parser)
        command_parser.exit(2, f"{command_parser.prog}: error: {message}\n")


if __name__ == "__main__":
    main()
