"""The worker side of the Activault S3 buffer: S3 clients, megabatch compiling and shuffling,
shared-memory slots, ranged downloads and the download loop each worker process runs."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

logger = logging.getLogger(__name__)

KB = 1024
MB = KB * KB
OUTER_CACHE_DIR = "cache"
INNER_CACHE_DIR = "cache"
BUCKET_NAME = os.environ.get("S3_BUCKET_NAME", "main")

PRESIGNED_URL_SECONDS = 604700  # about a week
_POLL_SECONDS = 0.1  # how often a waiting process looks at the stop flag
_TRIES = 5  # attempts per ranged request
_SKIPPED = -1  # on the readable queue: a file that could not be downloaded
# like aiohttp: env proxies ignored
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _boto3():
    try:
        import boto3
    except ImportError as error:
        raise ImportError("reading Activault activations from S3 needs the package `boto3` (pip "
                          "install boto3)") \
            from error
    return boto3


def create_s3_client(access_key_id: str | None = None, secret_access_key: str | None = None,
                     endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client for S3-compatible storage (path-style addresses, s3v4 signatures). Missing
    arguments are read from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and S3_ENDPOINT_URL."""
    access_key_id = access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
    secret_access_key = secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    endpoint_url = endpoint_url or os.environ.get("S3_ENDPOINT_URL")
    if not access_key_id or not secret_access_key:
        raise ValueError("S3 credentials are needed: pass access_key_id and secret_access_key, or "
                         "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if not endpoint_url:
        raise ValueError("an S3 endpoint URL is needed: pass endpoint_url or set S3_ENDPOINT_URL")
    boto3 = _boto3()
    return boto3.session.Session().client(
        service_name="s3", aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
        endpoint_url=endpoint_url, use_ssl=True, verify=True,
        config=boto3.session.Config(s3={"addressing_style": "path"}, signature_version="s3v4"))


def ensure_spawn_context() -> None:
    """Make 'spawn' the process-wide multiprocessing start method; warn when that is impossible.
    (S3RCache does not need it: its workers come from a context of their own.)"""
    if mp.get_start_method(allow_none=True) != "spawn":
        try:
            mp.set_start_method("spawn", force=True)
        except RuntimeError:
            warnings.warn("the multiprocessing start method is not 'spawn', which may cause "
                          "problems", stacklevel=2)


def shuffle_megabatch_tokens(t: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """`t` [n_sequences, seq_len, d] with its token vectors permuted across sequences (seed None: a
    fresh one)."""
    if t.ndim != 3:
        raise ValueError("expected a megabatch of shape [n_sequences, seq_len, d], got shape "
                         f"{tuple(t.shape)}")
    generator = torch.Generator()
    generator.manual_seed(seed) if seed is not None else generator.seed()
    tokens = t.reshape(t.shape[0] * t.shape[1], t.shape[2])
    return tokens[torch.randperm(tokens.shape[0], generator=generator)].reshape(t.shape)


def compile(byte_buffers: list[tuple[int, bytes]], shuffle: bool = True, seed: int | None = None,
            return_ids: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """A megabatch from its downloaded `(start_byte, chunk)` pieces (any order): the saved dict when
    return_ids (token order kept, so states line up with input_ids), else its states, token-shuffled
    if asked."""
    data = b"".join(chunk for _, chunk in sorted(byte_buffers, key=lambda piece: piece[0]))
    megabatch = torch.load(BytesIO(data), weights_only=True)
    if return_ids:
        return megabatch
    if isinstance(megabatch, dict):
        if "states" not in megabatch:
            raise ValueError("expected a megabatch dict with a 'states' entry, got keys "
                             f"{sorted(megabatch)}")
        megabatch = megabatch["states"]
    return shuffle_megabatch_tokens(megabatch, seed) if shuffle else megabatch


class SharedBuffer(nn.Module):
    """A shared-memory slot for a megabatch's states and input_ids (a module's parameters stay
    shared when sent to a worker, a dict's tensors would not)."""

    def __init__(self, shape: list[int], input_ids_shape: list[int], dtype: torch.dtype):
        super().__init__()
        self.states = nn.Parameter(torch.ones(shape, dtype=dtype), requires_grad=False)
        self.input_ids = nn.Parameter(torch.ones(input_ids_shape, dtype=torch.int64),
                                      requires_grad=False)

    def forward(self) -> dict[str, torch.Tensor]:
        return {"states": self.states, "input_ids": self.input_ids}


def _stopping(stop: Any) -> bool:
    parent = multiprocessing.parent_process()
    return bool(stop.value) or (parent is not None and not parent.is_alive())


def _wait(call: Any, stop: Any | None) -> Any:
    """`call(timeout)` until its queue is neither empty nor full; None once `stop` is set (or the
    parent process died) meanwhile. Without `stop`, one blocking call."""
    while stop is not None and not _stopping(stop):
        try:
            return call(_POLL_SECONDS)
        except (queue.Empty, queue.Full):
            pass
    return call(None) if stop is None else None


def write_tensor(t: torch.Tensor | dict[str, torch.Tensor], buffer: Any, writeable_tensors: Any,
                 readable_tensors: Any, ongoing_downloads: Any, stop: Any | None = None) -> bool:
    """Copy a megabatch into a free slot of `buffer`, announce the slot as readable and count the
    download done. With `stop` (a shared flag), give up (returning False) when it is set while
    waiting."""
    slot = _wait(lambda timeout: writeable_tensors.get(timeout=timeout), stop)
    if slot is None:
        return False
    if isinstance(buffer[0], SharedBuffer):
        if not isinstance(t, dict):
            raise TypeError("return_ids needs megabatches saved as dicts with 'states' and "
                             f"'input_ids', got a {type(t).__name__}")
        pairs = [(buffer[slot].states, t["states"]), (buffer[slot].input_ids, t["input_ids"])]
    else:
        pairs = [(buffer[slot], t)]
    for target, value in pairs:
        if value.shape != target.shape:
            raise ValueError(f"a megabatch of shape {tuple(value.shape)} does not fit its slot of "
                             f"shape {tuple(target.shape)} (metadata.json's shape)")
        target.copy_(value)
    written = _wait(lambda timeout: readable_tensors.put(slot, timeout=timeout) or True, stop)
    with ongoing_downloads.get_lock():
        ongoing_downloads.value -= 1
    return bool(written)


def _fetch(url: str, start: int, chunk_size: int) -> tuple[int, int, int | None, bytes]:
    """(start, status, object size from Content-Range, body) of a ranged GET; past the end (416): an
    empty body."""
    request = urllib.request.Request(url,
                                     headers={"Range": f"bytes={start}-{start + chunk_size - 1}"})
    for attempt in range(_TRIES):
        try:
            with _NO_PROXY.open(request, timeout=300) as reply:
                status, headers, body = reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as error:
            if error.code != 416:
                failure: Exception = error
                time.sleep(0.2 * 2**attempt)
                continue
            status, headers, body = 416, error.headers, b""
        except OSError as error:
            failure = error
            time.sleep(0.2 * 2**attempt)
            continue
        total = (headers.get("Content-Range") or "").rpartition("/")[2]
        return start, status, int(total) if total.isdigit() else None, body
    raise failure


def _download(pool: ThreadPoolExecutor, url: str, size: int,
              chunk_size: int) -> list[tuple[int, bytes]] | None:
    """A file as `(start_byte, chunk)` pieces fetched `chunk_size` bytes at a time (all of it, even
    when the object is larger than `size`); None after repeated failures."""
    try:
        starts = range(0, size, chunk_size)
        replies = list(pool.map(lambda start: _fetch(url, start, chunk_size), starts))
        total = next((reply[2] for reply in replies if reply[2] is not None), None)
        if total is not None and total > len(starts) * chunk_size:
            more = range(len(starts) * chunk_size, total, chunk_size)
            replies += pool.map(lambda start: _fetch(url, start, chunk_size), more)
    except Exception as error:  # noqa: BLE001 (the file is skipped, as upstream does)
        logger.error("could not download %s: %s", url.split("?")[0], error)
        return None
    # a server that ignored the Range header
    whole = [body for _, status, _, body in replies if status == 200]
    return [(0, whole[0])] if whole else [(start, body) for start, _, _, body in replies]


def download_loop(buffer: Any, file_index: Any, s3_paths: list[str], stop: Any,
                  readable_tensors: Any, writeable_tensors: Any, ongoing_downloads: Any,
                  concurrency: int, bytes_per_file: int, chunk_size: int, shuffle: bool,
                  seed: int | None, return_ids: bool, errors: Any = None) -> None:
    """A worker: claim the next file of `s3_paths` (shared `file_index`), download (`concurrency`
    requests at once), compile (file i shuffled with seed `seed + i`) and write it into `buffer`,
    until the files run out or `stop` is set. A file that cannot be downloaded is announced as
    skipped; other errors go to `errors` and stop all workers."""
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        while not _stopping(stop):
            with file_index.get_lock(), ongoing_downloads.get_lock():
                position = file_index.value
                if position >= len(s3_paths):
                    break
                file_index.value += 1
                ongoing_downloads.value += 1
            url = s3_paths[position]
            try:
                pieces = _download(pool, url, bytes_per_file, chunk_size)
                if pieces is None:
                    with ongoing_downloads.get_lock():
                        ongoing_downloads.value -= 1
                    _wait(lambda timeout: readable_tensors.put(_SKIPPED, timeout=timeout), stop)
                    continue
                megabatch = compile(pieces, shuffle, None if seed is None else seed + position,
                                    return_ids)
                write_tensor(megabatch, buffer, writeable_tensors, readable_tensors,
                             ongoing_downloads, stop)
            except Exception as error:  # noqa: BLE001 (the main process raises it)
                message = f"{type(error).__name__} while reading {url.split('?')[0]}: {error}"
                logger.error(message)
                if errors is not None:
                    errors.put(message)
                stop.value = True


def _worker_context() -> Any:
    """Fresh processes, never forks of this one (safe with CUDA and threads): from a fork server
    that has imported this module where the platform has one (later workers then start in
    milliseconds), else spawned."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _shutdown(processes: list, stop: Any) -> None:
    """Set the stop flag, give the workers a few seconds, then terminate the rest."""
    stop.value = True
    for process in processes:
        process.join(timeout=5)
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join()
    processes.clear()
