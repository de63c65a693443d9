"""The main-process side of the Activault S3 buffer: `S3RCache` (lists the files, runs the workers,
iterates over megabatches) and `ActivaultS3ActivationBuffer` (shuffled batches of token vectors from
them)."""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from .workers import (
    _POLL_SECONDS,
    _SKIPPED,
    BUCKET_NAME,
    MB,
    PRESIGNED_URL_SECONDS,
    SharedBuffer,
    _boto3,
    _shutdown,
    _worker_context,
    download_loop,
)

logger = logging.getLogger(__name__)


class S3RCache:
    """Iterator over the megabatches of Activault runs in an S3 bucket: `[n_sequences, seq_len, d]`
    tensors, or dicts with "states" and "input_ids" when return_ids.

    s3_client: a boto3 client (None: one for region eu-north1, endpoint S3_ENDPOINT_URL, credentials
      from the environment). s3_prefix: `run_name/hook_name`, or a list of them with equal shapes
      and dtypes.
    shuffle: permute each megabatch's tokens (not with return_ids). preserve_file_order: read files
      in key order (else in an order shuffled with `seed`). paths: object keys to read instead of
      every file under the prefixes.
    chunk_size: bytes per ranged request, `concurrency` requests at once per worker; buffer_size:
      megabatches held.
    """

    @classmethod
    def from_credentials(cls, aws_access_key_id: str, aws_secret_access_key: str, *args,
                         **kwargs) -> S3RCache:
        """A cache on a client with these credentials (endpoint: S3_ENDPOINT_URL, if set)."""
        client = _boto3().client("s3", aws_access_key_id=aws_access_key_id,
                                 aws_secret_access_key=aws_secret_access_key,
                                 endpoint_url=os.environ.get("S3_ENDPOINT_URL"))
        return cls(client, *args, **kwargs)

    def __init__(self, s3_client: Any, s3_prefix: str | list[str], bucket_name: str = BUCKET_NAME,
                 device: str = "cpu", concurrency: int = 100, chunk_size: int = MB * 16,
                 buffer_size: int = 2, shuffle: bool = True, preserve_file_order: bool = False,
                 seed: int | None = 42, paths: list[str] | None = None, n_workers: int = 1,
                 return_ids: bool = False) -> None:
        for name, value in (("concurrency", concurrency), ("chunk_size", chunk_size),
                            ("buffer_size", buffer_size), ("n_workers", n_workers)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        prefixes = [s3_prefix] if isinstance(s3_prefix, str) else list(s3_prefix)
        if not prefixes or not all(isinstance(prefix, str) and prefix.strip("/")
                                   for prefix in prefixes):
            raise ValueError("s3_prefix must be 'run_name/hook_name' or a non-empty list of them, "
                             f"got {s3_prefix!r}")
        if s3_client is None:
            boto3 = _boto3()
            s3_client = boto3.client("s3", region_name="eu-north1",
                                     endpoint_url=os.environ.get("S3_ENDPOINT_URL"),
                                     config=boto3.session.Config(signature_version="s3v4"))
        self.s3_client, self.s3_prefix, self.bucket_name, self.device = (s3_client, s3_prefix,
                                                                         bucket_name, device)
        self.concurrency, self.chunk_size, self.buffer_size = (int(concurrency), int(chunk_size),
                                                               int(buffer_size))
        self.shuffle, self.preserve_file_order, self.seed = shuffle, preserve_file_order, seed
        self.paths, self.n_workers, self.return_ids = paths, int(n_workers), return_ids
        self._random = random.Random(seed)
        self._s3_paths = self._list_s3_files()  # sets self.metadata and self.config too
        needed = {"shape", "dtype", "bytes_per_file", *(["input_ids_shape"] if return_ids else [])}
        missing = needed - set(self.metadata)
        if missing:
            raise ValueError(f"metadata.json of {prefixes[0]!r} lacks {sorted(missing)}")
        dtype = {str(value): value for value in vars(torch).values()
                 if isinstance(value, torch.dtype)}.get(
            "torch." + str(self.metadata["dtype"]).removeprefix("torch."))
        if dtype is None:
            raise ValueError("metadata.json's dtype must name a torch dtype, got "
                             f"{self.metadata['dtype']!r}")
        self._activation_dtype, shape = dtype, self.metadata["shape"]
        if return_ids:
            self.buffer = [SharedBuffer(shape, self.metadata["input_ids_shape"],
                                        dtype).share_memory()
                           for _ in range(self.buffer_size)]
        else:
            # [slots, *shape]
            self.buffer = torch.empty((self.buffer_size, *shape), dtype=dtype).share_memory_()
        self._context = _worker_context()
        self._stop, self._file_index = self._context.Value("b", False), self._context.Value("i", 0)
        self._ongoing_downloads = self._context.Value("i", 0)
        self._running_processes: list = []
        # messages taken / due in this pass
        self._initial_file_index = self._received = self._expected = 0
        self._reset()
        weakref.finalize(self, _shutdown, self._running_processes, self._stop)

    @property
    def current_file_index(self) -> int:
        """How many files of the list the workers have claimed (save it to resume with
        set_file_index)."""
        return self._file_index.value

    def set_file_index(self, index: int) -> None:
        """Start the next pass at file `index` of the list (to resume a run)."""
        if not 0 <= index <= len(self._s3_paths):
            raise ValueError(f"file index must be in [0, {len(self._s3_paths)}], got {index}")
        self._initial_file_index = index

    def sync(self) -> None:
        """List the bucket again (files written since)."""
        self._s3_paths = self._list_s3_files()

    def _reset(self) -> None:
        """Flags and fresh queues for a new pass (no worker is running)."""
        (self._file_index.value, self._ongoing_downloads.value,
         self._stop.value) = self._initial_file_index, 0, False
        self.readable_tensors = self._context.Queue(maxsize=self.buffer_size + self.n_workers)
        self.writeable_tensors = self._context.Queue(maxsize=self.buffer_size)
        self._errors = self._context.Queue()
        for slot in range(self.buffer_size):
            self.writeable_tensors.put(slot)

    def _read_json(self, key: str) -> dict:
        return json.loads(self.s3_client.get_object(Bucket=self.bucket_name,
                                                    Key=key)["Body"].read())

    def _list_s3_files(self) -> list[str]:
        """Presigned URLs of the megabatch files under the prefixes; sets `metadata` (the
        first prefix's) and `config` (the runs' cfg.json, with total_tokens, n_total_files and
        batches_processed summed)."""
        keys, self.metadata, self.config = [], None, None
        for prefix in ([self.s3_prefix] if isinstance(self.s3_prefix, str) else self.s3_prefix):
            prefix = prefix.rstrip("/")
            metadata = self._read_json(f"{prefix}/metadata.json")
            self.metadata = self.metadata or metadata
            if [metadata.get("shape"), metadata.get("dtype")] != [self.metadata["shape"],
                                                                  self.metadata["dtype"]]:
                raise ValueError(f"{prefix!r} holds megabatches of shape {metadata.get('shape')} "
                                 f"and dtype {metadata.get('dtype')}, expected "
                                 f"{self.metadata['shape']} and {self.metadata['dtype']}")
            try:
                parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
                run_config = self._read_json(f"{parent}/cfg.json")
            except Exception as error:  # noqa: BLE001 (cfg.json is optional)
                logger.warning("no cfg.json for %s: %s", prefix, error)
                run_config = {}
            self.config = self.config or {**run_config, "total_tokens": 0, "n_total_files": 0,
                                          "batches_processed": 0}
            for name in ("total_tokens", "n_total_files", "batches_processed"):
                self.config[name] += run_config.get(name, 0)
            if self.paths is None:  # "/": a prefix "run/blocks.1" must not take in "run/blocks.10"
                skip = {f"{prefix}/metadata.json", f"{prefix}/statistics.json"}
                paginator = self.s3_client.get_paginator("list_objects_v2")
                pages = paginator.paginate(Bucket=self.bucket_name, Prefix=prefix + "/")
                keys += [item["Key"] for page in pages for item in page.get("Contents", [])
                         if item["Key"] not in skip and not item["Key"].endswith("cfg.json")]
        keys = list(self.paths) if self.paths is not None else sorted(keys)
        if not self.preserve_file_order:
            self._random.shuffle(keys)
        return [self.s3_client.generate_presigned_url("get_object",
                                                      Params={"Bucket": self.bucket_name,
                                                              "Key": key},
                                                      ExpiresIn=PRESIGNED_URL_SECONDS)
                for key in keys]

    def __iter__(self) -> S3RCache:
        if self._running_processes:
            raise ValueError("cannot iterate over the cache a second time while it is downloading "
                             "(call finalize)")
        self._reset()
        self._received, self._expected = 0, len(self._s3_paths) - self._initial_file_index
        for _ in range(min(self.n_workers, self._expected)):
            process = self._context.Process(target=download_loop, daemon=True, args=(
                self.buffer, self._file_index, self._s3_paths, self._stop, self.readable_tensors,
                self.writeable_tensors, self._ongoing_downloads, self.concurrency,
                self.metadata["bytes_per_file"], self.chunk_size, self.shuffle, self.seed,
                self.return_ids, self._errors))
            process.start()
            self._running_processes.append(process)
        return self

    def __next__(self) -> torch.Tensor | dict[str, torch.Tensor]:
        while self._received < self._expected:
            slot = self._next_slot()
            self._received += 1
            if slot != _SKIPPED:
                slot_tensors = (self.buffer[slot]() if self.return_ids
                                else {"states": self.buffer[slot]})
                item = {name: value.detach().clone() for name, value in slot_tensors.items()}
                self.writeable_tensors.put(slot)
                return item if self.return_ids else item["states"]
        self._stop_downloading()
        raise StopIteration

    def _next_slot(self) -> int:
        """The next readable slot (or _SKIPPED); RuntimeError once the workers failed or died and
        nothing is left."""
        while True:
            waiting = not self._stop.value and any(process.is_alive()
                                                   for process in self._running_processes)
            try:
                return self.readable_tensors.get(timeout=_POLL_SECONDS if waiting else 1.0)
            except queue.Empty:
                if waiting:
                    continue
            problems, codes = [], [process.exitcode for process in self._running_processes]
            try:
                while True:
                    problems.append(self._errors.get(timeout=0.5))
            except queue.Empty:
                self._stop_downloading()
            raise RuntimeError("downloading Activault megabatches failed: " +
                               ("; ".join(problems) or "the workers exited early (exit codes "
                                                       f"{codes})"))

    def finalize(self) -> None:
        """Stop the download workers (the iteration then ends)."""
        self._stop_downloading()

    def _stop_downloading(self) -> None:
        self._expected = self._received
        self._file_index.value = len(self._s3_paths)
        _shutdown(self._running_processes, self._stop)
        self._ongoing_downloads.value = 0


class ActivaultS3ActivationBuffer:
    """Iterator over shuffled `[batch_size, d]` batches of the token vectors in a cache's
    megabatches (an S3RCache, or any iterable of `[n_sequences, seq_len, d]` tensors or dicts with
    "states").

    A refresh keeps the unread vectors, adds megabatches until at least batch_size are unread and
    shuffles them, so every vector is served once; the last batch may be smaller. io: "out" or "in"
    (Activault stores one activation per token, whichever side of the hook it read). seed: the
    shuffling seed (None: torch's global generator).
    """

    def __init__(self, cache: S3RCache | Any, batch_size: int = 8192,
                 device: str | torch.device = "cpu", io: str = "out", seed: int | None = None):
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if io not in ("out", "in"):
            raise ValueError("io must be 'out' or 'in' (Activault stores one activation per "
                             f"token), got {io!r}")
        self.cache = iter(cache)
        self.batch_size, self.device, self.io, self.seed = (int(batch_size), torch.device(device),
                                                            io, seed)
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._exhausted, self._position = False, 0
        self.states: torch.Tensor | None = None  # [n, d], shuffled
        self.read_mask: torch.Tensor | None = None  # [n], True where served
        self.refresh()

    @property
    def n_unread(self) -> int:
        return 0 if self.states is None else self.states.shape[0] - self._position

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        with torch.no_grad():
            if self.n_unread < self.batch_size:
                self.refresh()
            if self.n_unread == 0:
                raise StopIteration
            # [batch_size, d]
            batch = self.states[self._position : self._position + self.batch_size]
            self.read_mask[self._position : self._position + batch.shape[0]] = True
            self._position += batch.shape[0]
            return batch

    def refresh(self) -> None:
        """Keep the unread vectors, add megabatches until batch_size are unread (or the cache ends),
        shuffle."""
        parts = [] if self.states is None else [self.states[self._position:]]
        while sum(part.shape[0] for part in parts) < self.batch_size and not self._exhausted:
            try:
                megabatch = next(self.cache)
            except StopIteration:
                self._exhausted = True
                break
            states = megabatch["states"] if isinstance(megabatch, dict) else megabatch
            if states.ndim != 3 or (parts and states.shape[-1] != parts[0].shape[-1]):
                raise ValueError("expected megabatches of shape [n_sequences, seq_len, d] with one "
                                 f"d, got {tuple(states.shape)}"
                                 + (f" after d={parts[0].shape[-1]}" if parts else ""))
            parts.append(states.reshape(-1, states.shape[-1]).to(self.device))
        pool = torch.cat(parts) if parts else None
        if pool is None or pool.shape[0] == 0:
            self.states = self.read_mask = None
        else:
            self.states = pool[torch.randperm(pool.shape[0],
                                              generator=self._generator).to(self.device)]
            self.read_mask = torch.zeros(pool.shape[0], dtype=torch.bool, device=self.device)
        self._position = 0

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of the buffer, saved with trained dictionaries."""
        cache = self.cache if isinstance(self.cache, S3RCache) else None
        return {"source": "activault", "s3_prefix": cache and cache.s3_prefix,
                "bucket_name": cache and cache.bucket_name, "io": self.io,
                "out_batch_size": self.batch_size, "device": str(self.device), "seed": self.seed}

    def close(self) -> None:
        """Stop the cache's download workers."""
        for name in ("finalize", "close"):
            if hasattr(self.cache, name):
                return getattr(self.cache, name)()
