"""Find the peer venvs built by `bench/setup_peers.sh` and time a peer's TopK training step in its
own venv.

Standard library only, so our own benchmark can import it without any peer installed:

    from bench.peers import PEERS, peer_python, run_peer
    figures = run_peer("sae-lens", d_in=576, dict_size=4608, k=32, batch=4096, steps=20,
                       dead_fraction=0.1)
    # {"peer": "sae-lens", "version": "6.54.12", "tokens_per_s": ..., "step_ms": ..., ...}
    # or {..., "error": ...}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PEERS = ("dictionary-learning", "sae-lens", "eai-sparsify")
PEER_STEP_SCRIPT = Path(__file__).resolve().with_name("peer_step.py")


def peers_dir() -> Path:
    """Where setup_peers.sh puts the venvs: $PEERS_DIR or ~/.cache/dictionary_learning/peers."""
    return Path(os.environ.get("PEERS_DIR")
                or Path.home() / ".cache" / "dictionary_learning" / "peers")


def peer_python(name: str) -> Path | None:
    """The python of the peer's venv, or None if that venv has not been built."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}: expected one of {PEERS}")
    python = peers_dir() / name / "bin" / "python"
    return python if python.exists() else None


def run_peer(
    name: str,
    *,
    d_in: int = 576,
    dict_size: int = 4608,
    k: int = 32,
    batch: int = 4096,
    steps: int = 20,
    warmup: int = 3,
    dead_fraction: float = 0.0,
    seed: int = 0,
    threads: int = 2,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 1800.0,
    script: str | Path = PEER_STEP_SCRIPT,
    python: str | Path | None = None,
) -> dict:
    """Run bench/peer_step.py (or another peer-side `script` taking the same arguments) for one peer
    in its venv; return its JSON line as a dict.

    `python`: run it with this interpreter instead of the peer's venv (a machine whose own python
    holds the peer, such as a GPU machine without network). Never raises for a failing peer: a
    missing venv, a crash, a timeout or unparsable output gives a dict with an "error" key (plus
    "peer" and the shape).
    """
    shape = dict(d_in=d_in, dict_size=dict_size, k=k, batch=batch, steps=steps, warmup=warmup,
                 dead_fraction=dead_fraction, seed=seed, threads=threads)
    failure = {"peer": name, **shape}
    python = peer_python(name) if python is None else python  # (another python: its own packages)
    if python is None:
        return {**failure, "error": f"no venv at {peers_dir() / name}: run bench/setup_peers.sh"}
    command = [str(python), str(script), "--peer", name]
    for key, value in shape.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    command += list(extra_args)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        # keep the BLAS / OpenMP pools to the requested thread count
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    environment.pop("PYTHONPATH", None)  # never let the peer import our package
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                   env=environment, cwd=str(Path(script).resolve().parent))
    except subprocess.TimeoutExpired:
        return {**failure, "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(completed.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    stderr_tail = completed.stderr.strip().splitlines()[-5:]
    return {**failure, "error": f"exit code {completed.returncode}, no JSON line",
            "stderr_tail": stderr_tail}


if __name__ == "__main__":
    # python bench/peers.py [peer ...]: quick check with a small shape
    for peer in sys.argv[1:] or PEERS:
        print(json.dumps(run_peer(peer, d_in=64, dict_size=512, k=8, batch=512, steps=3, warmup=2,
                                  threads=1)))
