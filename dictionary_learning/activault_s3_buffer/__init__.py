"""Activations pre-computed by tilde-research's Activault, streamed from an S3 bucket (upstream's
import path).

Activault writes, under `{run_name}/{hook_name}/` in a bucket: `metadata.json` ({"shape":
[n_sequences, seq_len, d], "dtype": "torch.float16", "input_ids_shape": [n_sequences, seq_len],
"bytes_per_file": ..., ...}), an optional `statistics.json`, `{run_name}/cfg.json`, and megabatch
files `{uuid}--{attempt}_{job}.saved.pt`, each a `torch.save` of {"states": [n_sequences,
seq_len, d], "input_ids": [n_sequences, seq_len], "tensor_bytes": int} (older files: the states
tensor alone).

`S3RCache` lists the files as presigned URLs and iterates over their megabatches: `n_workers` worker
processes download each file in ranged chunks, optionally shuffle its tokens, and hand it over
through `buffer_size` shared-memory slots. `ActivaultS3ActivationBuffer` serves shuffled batches of
token vectors from them, like `ActivationBuffer`. boto3 is imported only when an S3 client is made.
"""

from .cache import ActivaultS3ActivationBuffer, S3RCache
from .workers import (
    BUCKET_NAME,
    INNER_CACHE_DIR,
    KB,
    MB,
    OUTER_CACHE_DIR,
    SharedBuffer,
    compile,
    create_s3_client,
    download_loop,
    ensure_spawn_context,
    shuffle_megabatch_tokens,
    write_tensor,
)

__all__ = [
    "ActivaultS3ActivationBuffer", "BUCKET_NAME", "INNER_CACHE_DIR", "KB", "MB", "OUTER_CACHE_DIR",
    "S3RCache", "SharedBuffer", "compile", "create_s3_client", "download_loop",
    "ensure_spawn_context", "shuffle_megabatch_tokens", "write_tensor",
]
