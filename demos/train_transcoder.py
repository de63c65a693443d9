"""Train a TopK transcoder from SmolLM2's layer-6 MLP input (after its norm) to the MLP's output, and measure the
language-model loss with the transcoder standing in for the MLP.

    python demos/train_transcoder.py     # ~3 minutes on a 2-core CPU
"""

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.evaluation import evaluate
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary

model = load_model("smollm2-135m")
points = (hook(model, 6, "mlp_in"), hook(model, 6, "mlp_out"))
buffer = ActivationBuffer(default_corpus(repeat=True), model, points, io="in_to_out", n_ctxs=128, ctx_len=128,
                          refresh_batch_size=32, out_batch_size=1024, remove_bos=True)
steps = 150
config = dict(trainer=TopKTrainer, activation_dim=576, output_dim=576, transcoder=True, skip=True,
              dict_size=2304, k=32, lr=1e-3, steps=steps, warmup_steps=15, seed=0, layer=6,
              lm_name="smollm2-135m", submodule_name="layers.6.mlp", dead_feature_threshold=100_000)
trainSAE(buffer, [config], steps, save_dir="runs/demo_transcoder",
         normalize_activations="d_model", log_steps=25)

transcoder, _ = load_dictionary("runs/demo_transcoder/trainer_0")
metrics = evaluate(transcoder, buffer, batch_size=8, n_batches=2, loss_batches=1)
print(f"transcoder: fvu of the MLP output {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}; CE clean "
      f"{metrics['ce_clean']:.3f}, with the transcoder as the MLP {metrics['ce_patched']:.3f}, MLP zeroed "
      f"{metrics['ce_zero']:.3f}: {metrics['frac_recovered']:.1%} of the MLP's loss contribution recovered")
