"""Sparsely connected autoencoders on SmolLM2 at small scale on a CPU: train a suite (an attention
SAE and a transcoder per layer) on the first layers, select connections, fine-tune through the
pruned forward pass, and print CE against C before and after.

    python demos/scae.py [--layers 2] [--dict-size 1152] [--k 16]
    python demos/scae.py --suite runs/demo_scae/suite           # start from a saved suite instead
    python demos/scae.py --cache acts_scae/   # the modules' activations read into a disk cache once
    python demos/scae.py --model tiny-llama --dict-size 64 --k 4 --sae-steps 5 --finetune-steps 2 \\
        --out /tmp/demo_scae                                     # a quick check

The defaults took 5.6 minutes alone on a 2-core AMD EPYC and 17.8 minutes sharing it with two other
runs (README, 2026-12-02). Writes runs/demo_scae/: the modules (modules/suite/, trained from one
activation stream), the fine-tuned suite with its connections (suite/), connections.png,
ce_versus_c.png and ce_versus_c.md.
"""

import argparse
import itertools
from pathlib import Path

from dictionary_learning import ActivationCache, default_corpus, load_model, write_cache
from dictionary_learning.files import atomic_write
from dictionary_learning.scae import (
    SCAESuite,
    ce_table,
    ce_versus_c,
    evaluate_suite,
    module_table,
    plot_ce_versus_c,
    plot_connection_statistics,
    select_connections,
    suite_hook_points,
    train_scae_suite,
    train_suite,
)


def parser() -> argparse.ArgumentParser:
    """The demo's options; the defaults are the settings of the README's figures."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), tiny-llama, tiny-gpt2, a local folder or a hub id")
    p.add_argument("--layers", type=int, default=2,
                   help="modules for the first this many layers (default %(default)s)")
    p.add_argument("--dict-size", type=int, default=1152,
                   help="features per module (default %(default)s)")
    p.add_argument("--k", type=int, default=16,
                   help="active features per token (default %(default)s)")
    p.add_argument("--sae-steps", type=int, default=150,
                   help="training steps of the modules, 1,024 tokens each (default %(default)s)")
    p.add_argument("--finetune-steps", type=int, default=20,
                   help="fine-tuning steps through the pruned pass at C = 16, 4 texts each "
                   "(default %(default)s)")
    p.add_argument("--suite", default=None,
                   help="a saved SCAESuite folder to start from (skips training)")
    p.add_argument("--cache", default=None,
                   help="write every module's activations to this cache folder once, and train "
                   "the modules from it")
    p.add_argument("--out", default="runs/demo_scae", help="output folder (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = Path(args.out)

    # eager attention returns the patterns
    model = load_model(args.model, attn_implementation="eager")
    texts = default_corpus(repeat=True)
    selection_texts = list(itertools.islice(texts, 24))
    eval_texts = list(itertools.islice(texts, 24))

    # 1. one attention SAE and one transcoder per layer, all trained with trainSAE from one model
    #    pass per batch of texts
    if args.suite:
        suite = SCAESuite.load(args.suite)
    else:
        print(f"training the {2 * args.layers} modules of layers 0-{args.layers - 1} from one "
              "activation stream")
        data = texts
        if args.cache:  # entries named as the modules (attn_0, mlp_0, ...), normalisation first
            write_cache(model, texts, suite_hook_points(model, args.layers), args.cache,
                        n_tokens=(args.sae_steps + 8) * 1024, model_name=args.model,
                        source="python-docs after the first 48 texts")  # after the held-out texts
            data = ActivationCache(args.cache, batch_size=1024, epochs=None)
        suite = train_suite(model, args.layers, args.dict_size, args.k, data, args.sae_steps,
                            model_name=args.model, lr=1e-3,
                            warmup_steps=max(1, args.sae_steps // 10),
                            dead_feature_threshold=100_000, n_ctxs=96, ctx_len=128,
                            refresh_batch_size=32, out_batch_size=1024, save_dir=out / "modules")

    # 2. CE against C before fine-tuning; the last C is the largest source count, so it keeps
    #    every connection
    Cs = [1, 4, 16, 64, sum(suite[name].d_sae for name in suite.names[:-1])]
    strongest = select_connections(suite, model, selection_texts, max(Cs))
    before = ce_versus_c(suite, model, None, eval_texts, Cs, batch_size=8, connections=strongest)
    print(ce_table(before, "(before fine-tuning)"))
    print(module_table(before[Cs.index(16)], "C = 16, before fine-tuning"))

    # 3. fine-tune through the pruned pass at C = 16 on local MSE and downstream CE
    connections = strongest.top(16)  # the same as selecting at C = 16
    stats = plot_connection_statistics(connections, out / "connections.png")
    print(f"at C = 16 the median feature keeps {stats['median_share_kept']:.1%} of its total "
          "|mean contribution|")
    train_scae_suite(suite, model, texts, connections, steps=args.finetune_steps, batch_texts=4,
                     lr=1e-4, save_dir=out)
    tuned = evaluate_suite(suite, model, eval_texts, suite.connections)  # the tuned parameters
    print(f"fine-tuned suite with the connections it was tuned on (C = 16): CE clean "
          f"{tuned['ce_clean']:.4f}, dense {tuned['ce_dense']:.4f}, "
          f"pruned {tuned['ce_pruned']:.4f}")
    print(module_table(tuned))
    after = ce_versus_c(suite, model, selection_texts, eval_texts, Cs, batch_size=8)
    print(ce_table(after, "(after fine-tuning at C = 16, connections selected again)"))

    plot_ce_versus_c({"before fine-tuning": before, "after": after}, out / "ce_versus_c.png")
    table = ce_table(before, "(before)") + "\n\n" + ce_table(after, "(after)") + "\n"
    atomic_write(out / "ce_versus_c.md", lambda tmp: Path(tmp).write_text(table))
    print(f"written to {out}/")


if __name__ == "__main__":
    main()
