"""Train a TopK SAE and a BatchTopK SAE together on SmolLM2's layer-6 residual stream (each batch read once).

    python demos/train_sae.py                     # ~3 minutes on a 2-core CPU
    python demos/train_sae.py --cache acts/       # read the activations into a disk cache once, train from it

With --cache, the activations are first written to that folder (skipped if it already holds them all; an interrupted
write continues) and both SAEs train from it, so later runs need no model forward.
"""

import argparse

from dictionary_learning import ActivationBuffer, ActivationCache, default_corpus, hook, load_model, write_cache
from dictionary_learning.dictionary import AutoEncoderTopK, BatchTopKSAE
from dictionary_learning.evaluation import evaluate
from dictionary_learning.trainers import BatchTopKTrainer, TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary

parser = argparse.ArgumentParser()
parser.add_argument("--cache", help="an activation cache folder to write (once) and train from")
args = parser.parse_args()

model = load_model("smollm2-135m")
point = hook(model, 6, "resid")
buffer = ActivationBuffer(default_corpus(repeat=True), model, point, n_ctxs=128, ctx_len=128,
                          refresh_batch_size=32, out_batch_size=1024, remove_bos=True)
steps = 150
data = buffer
if args.cache:  # steps x 1024 tokens plus the normalisation batches, read once
    write_cache(model, default_corpus(repeat=True), point, args.cache, n_tokens=(steps + 8) * 1024, remove_bos=True,
                model_name="smollm2-135m", source="python-docs")
    data = ActivationCache(args.cache, batch_size=1024, epochs=None)
common = dict(activation_dim=576, dict_size=2304, k=32, lr=1e-3, steps=steps, warmup_steps=15, seed=0,
              layer=6, lm_name="smollm2-135m", submodule_name=str(point), dead_feature_threshold=100_000)
configs = [dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, wandb_name="topk", **common),
           dict(trainer=BatchTopKTrainer, dict_class=BatchTopKSAE, wandb_name="batchtopk", **common)]
trainSAE(data, configs, steps, save_dir="runs/demo_sae",
         normalize_activations="d_model", log_steps=25)

for i, name in enumerate(("TopK", "BatchTopK")):
    sae, config = load_dictionary(f"runs/demo_sae/trainer_{i}")
    metrics = evaluate(sae, buffer, batch_size=8, n_batches=2, loss_batches=1)
    print(f"{name:9s} fvu {metrics['fvu']:.3f}  L0 {metrics['l0']:.1f}  alive {metrics['frac_alive']:.2f}  "
          f"CE clean {metrics['ce_clean']:.3f} patched {metrics['ce_patched']:.3f} zero {metrics['ce_zero']:.3f}  "
          f"recovered {metrics['frac_recovered']:.3f}")
