"""A disk cache of activations: `write_cache` reads them once into sharded safetensors files,
`ActivationCache` serves shuffled batches from them, in the forms ActivationBuffer yields, for as
many epochs and runs as wanted.

Layout of a cache folder: `shard_00000.safetensors`, `shard_00001.safetensors`, ... (each holds one
`[tokens, width]` tensor per hook point, named `hook_{i}`, rows aligned across hook points and
written unshuffled, in text order) and `manifest.json`: the settings (model, text source, hook
points, entries, widths, dtype, ctx_len, ...), the shard list with token counts, and where the text
source stands. Every file is written atomically and the manifest is rewritten after each shard, so
an interrupted `write_cache` called again with the same arguments continues where the last written
shard ended, and the result equals an uninterrupted run's, shard for shard.

Shuffling (ActivationCache): each epoch takes a seeded permutation of the shards and cuts it into
windows of `window_shards` shards; a window's rows are read (through safetensors' memory map, each
shard in one sequential read) and served in the order of a permutation seeded by (seed,
epoch, window), each batch gathered into a fresh tensor; batches continue across windows, and the
epoch's last partial batch is dropped. Memory: one window buffer (`window_shards * shard_tokens`
rows per hook point read, allocated once and reused), the pages of the shard being copied in, fewer
than one batch carried over and the batch served; never the whole cache.
"""

from .manifest import FORMAT, MANIFEST, VERSION, read_manifest, shard_name
from .read import ActivationCache
from .write import CacheConfig, cache_from_tensors, write_cache

__all__ = ["ActivationCache", "CacheConfig", "FORMAT", "MANIFEST", "VERSION", "cache_from_tensors",
           "read_manifest", "shard_name", "write_cache"]
