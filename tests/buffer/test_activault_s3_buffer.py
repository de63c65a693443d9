"""The Activault S3 buffer against megabatches written in Activault's format into a mocked S3 bucket
(moto's local server, so the spawned download workers reach it over HTTP like a real endpoint)."""

import io
import json
import sys
import time
import uuid
from multiprocessing import Value
from queue import Queue

import pytest
import torch

from dictionary_learning import activault_s3_buffer as activault
from dictionary_learning.activault_s3_buffer import (
    ActivaultS3ActivationBuffer,
    S3RCache,
    SharedBuffer,
    compile,
    shuffle_megabatch_tokens,
    workers,
    write_tensor,
)

BUCKET = "activations"
N_SEQUENCES, SEQ_LEN, D = 4, 5, 6  # one megabatch: [4, 5, 6], 20 token vectors
PREFIX = "run/blocks.1.hook_resid_post"


def rows(t):
    """The rows of `t` [..., d] as a sorted list of tuples (an exact multiset)."""
    return sorted(map(tuple, t.reshape(-1, t.shape[-1]).tolist()))


def megabatch_bytes(states, input_ids=None, with_ids=True):
    """A megabatch file as Activault's HookUploader saves it."""
    buffer = io.BytesIO()
    if with_ids:
        torch.save({"states": states, "input_ids": input_ids,
                    "tensor_bytes": states.numel() * states.element_size() + input_ids.numel() * 8},
                   buffer)
    else:  # the older format: the states tensor alone
        torch.save(states, buffer)
    return buffer.getvalue()


def put_run(client, prefix, n_files, seed, dtype=torch.float16, shape=(N_SEQUENCES, SEQ_LEN, D),
            understate=0, with_ids=True, corrupt=False, cfg=True):
    """Write `n_files` megabatches, metadata.json, statistics.json and the run's cfg.json; returns
    {key: (states, input_ids)}."""
    generator = torch.Generator().manual_seed(seed)
    files = {}
    for attempt in range(1, n_files + 1):
        states = torch.randn(shape, generator=generator).to(dtype)
        input_ids = torch.randint(0, 1000, shape[:2], generator=generator)
        body = megabatch_bytes(states, input_ids, with_ids)
        key = f"{prefix}/{uuid.UUID(int=seed * 1000 + attempt)}--{attempt}_0.saved.pt"
        client.put_object(Bucket=BUCKET, Key=key,
                          Body=b"not a torch file" * 10 if corrupt else body)
        files[key] = (states, input_ids)
    metadata = {"batch_size": shape[0], "sequence_length": shape[1], "dtype": str(dtype),
                "d_in": shape[2], "batches_per_file": 2, "shape": list(shape),
                "input_ids_shape": list(shape[:2]), "bytes_per_file": len(body) - understate}
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/metadata.json", Body=json.dumps(metadata))
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/statistics.json",
                      Body=json.dumps({"mean": [0.0] * shape[2]}))
    if cfg:  # one per run
        client.put_object(Bucket=BUCKET, Key=f"{prefix.rsplit('/', 1)[0]}/cfg.json",
                          Body=json.dumps(
            {"total_tokens": n_files * shape[0] * shape[1], "n_total_files": n_files,
             "batches_processed": 2 * n_files}))
    return files


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with runs in Activault's layout; yields (client, {prefix: files})."""
    pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            env.setenv(name, value)
        server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        env.setenv("S3_ENDPOINT_URL", f"http://{host}:{port}")
        client = activault.create_s3_client()
        client.create_bucket(Bucket=BUCKET)
        runs = {
            PREFIX: put_run(client, PREFIX, 3, seed=1),
            # shares PREFIX as a string prefix, with another width: must never be read as part of
            # PREFIX
            PREFIX + "_ln": put_run(client, PREFIX + "_ln", 1, seed=2, shape=(2, 3, 4), cfg=False),
            # metadata.json understates the file size: the downloader must follow Content-Range
            "run2/blocks.1.hook_resid_post": put_run(client, "run2/blocks.1.hook_resid_post", 2,
                                                     seed=3, understate=37),
            "old/blocks.1": put_run(client, "old/blocks.1", 2, seed=4, with_ids=False),
            "broken/blocks.1": put_run(client, "broken/blocks.1", 1, seed=5, corrupt=True),
        }
        yield client, runs
        server.stop()


def cache(client, prefix, **kwargs):
    kwargs = {"bucket_name": BUCKET, "chunk_size": 700, "concurrency": 4, "n_workers": 1, **kwargs}
    return S3RCache(client, prefix, **kwargs)


def test_buffer_serves_every_vector_once_shuffled(s3):
    client, runs = s3
    files = runs[PREFIX]
    source = cache(client, PREFIX, buffer_size=2)
    assert len(source._s3_paths) == 3  # not the _ln run, metadata, statistics or cfg.json
    assert source.config["total_tokens"] == 3 * N_SEQUENCES * SEQ_LEN
    buffer = ActivaultS3ActivationBuffer(source, batch_size=7, seed=0)
    start = time.perf_counter()
    batches = list(buffer)
    print(f"\n3 megabatches through one worker: {time.perf_counter() - start:.2f} s")
    # 60 vectors, leftovers carried across megabatches
    assert [b.shape for b in batches] == [(7, D)] * 8 + [(4, D)]
    assert all(b.dtype == torch.float16 for b in batches)
    served, written = torch.cat(batches), torch.cat([states for states, _ in files.values()])
    assert rows(served) == rows(written)
    assert not torch.equal(served[:20], written[:20].reshape(-1, D))  # shuffled, not in file order
    assert source._running_processes == [] and buffer.states is None
    assert buffer.config["s3_prefix"] == PREFIX and buffer.config["out_batch_size"] == 7


def test_return_ids_with_two_workers_gives_whole_files(s3):
    client, runs = s3
    source = cache(client, PREFIX, return_ids=True, n_workers=2, buffer_size=1)
    assert isinstance(source.buffer[0], SharedBuffer)
    served = list(source)
    expected = runs[PREFIX].values()
    assert len(served) == len(expected)
    for item in served:  # token order is kept, so states line up with input_ids
        assert item["states"].dtype == torch.float16 and item["input_ids"].dtype == torch.int64
        assert sum(torch.equal(item["states"], s) and torch.equal(item["input_ids"], i)
                   for s, i in expected) == 1
    assert source._running_processes == []


def test_several_prefixes_understated_sizes_and_the_old_format(s3):
    client, runs = s3
    prefixes = [PREFIX, "run2/blocks.1.hook_resid_post", "old/blocks.1"]
    source = cache(client, prefixes, shuffle=False)
    served = list(source)
    expected = [states for prefix in prefixes for states, _ in runs[prefix].values()]
    assert len(served) == len(expected) == 7
    assert sorted(rows(t) for t in served) == sorted(rows(t) for t in expected)
    for t in served:  # shuffle=False: each megabatch arrives whole and in token order
        assert sum(torch.equal(t, states) for states in expected) == 1
    assert source.config["n_total_files"] == 7
    with pytest.raises(ValueError, match=r"shape \[2, 3, 4\]"):
        cache(client, [PREFIX, PREFIX + "_ln"])


def test_close_mid_stream_then_resume_from_a_file_index(s3):
    client, runs = s3
    keys = sorted(runs[PREFIX])
    source = cache(client, PREFIX, buffer_size=1, preserve_file_order=True, shuffle=False)
    buffer = ActivaultS3ActivationBuffer(source, batch_size=5)
    assert buffer.n_unread == N_SEQUENCES * SEQ_LEN  # one megabatch, the others wait in the worker
    next(buffer)
    processes = list(source._running_processes)
    start = time.perf_counter()
    buffer.close()
    assert time.perf_counter() - start < 6
    assert source._running_processes == [] and not any(p.is_alive() for p in processes)
    with pytest.raises(StopIteration):
        next(source)

    source.set_file_index(1)  # resume: a new pass starting at the second file, in key order
    served = list(source)
    assert [rows(t) for t in served] == [rows(runs[PREFIX][key][0]) for key in keys[1:]]
    with pytest.raises(ValueError, match="file index"):
        source.set_file_index(4)


def test_a_failing_worker_raises_instead_of_hanging(s3):
    client, _ = s3
    source = cache(client, "broken/blocks.1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"broken/blocks\.1/"):
        list(source)
    assert time.perf_counter() - start < 10 and source._running_processes == []


def test_credentials_from_the_environment_sync_and_explicit_paths(s3):
    client, _ = s3
    first = put_run(client, "growing/blocks.1", 1, seed=6)
    source = S3RCache.from_credentials("testing", "testing", "growing/blocks.1", bucket_name=BUCKET)
    assert len(source._s3_paths) == 1
    second = put_run(client, "growing/blocks.1", 1, seed=7)
    source.sync()
    assert len(source._s3_paths) == 2
    (key, (states, _)), = second.items()
    # default client
    chosen = S3RCache(None, "growing/blocks.1", bucket_name=BUCKET, paths=[key], shuffle=False)
    assert [rows(t) for t in chosen] == [rows(states)] and key not in first
    client.put_object(Bucket=BUCKET, Key="bad/blocks.1/metadata.json", Body=json.dumps(
        {"shape": [1, 2, 3], "dtype": "torch.float17", "bytes_per_file": 10}))
    with pytest.raises(ValueError, match="float17"):
        S3RCache(client, "bad/blocks.1", bucket_name=BUCKET)
    with pytest.raises(ValueError, match="n_workers"):
        S3RCache(client, "growing/blocks.1", bucket_name=BUCKET, n_workers=0)


def test_shuffle_megabatch_tokens_permutes_tokens():
    t = torch.randn(3, 4, 5)
    shuffled = shuffle_megabatch_tokens(t, seed=7)
    assert shuffled.shape == t.shape and rows(shuffled) == rows(t)
    assert not torch.equal(shuffled, t)
    assert torch.equal(shuffle_megabatch_tokens(t, seed=7), shuffled)
    with pytest.raises(ValueError, match=r"\[n_sequences, seq_len, d\]"):
        shuffle_megabatch_tokens(torch.randn(12, 5))


def test_compile_joins_pieces_in_any_order():
    states, input_ids = torch.randn(2, 3, 4).bfloat16(), torch.arange(6).reshape(2, 3)
    data = megabatch_bytes(states, input_ids)
    pieces = [(start, data[start:start + 100]) for start in range(0, len(data), 100)][::-1]
    loaded = compile(pieces, shuffle=True, return_ids=True)  # with ids: never shuffled
    assert torch.equal(loaded["states"], states) and torch.equal(loaded["input_ids"], input_ids)
    assert torch.equal(compile(pieces, shuffle=False), states)
    shuffled = compile(pieces, shuffle=True, seed=3)
    assert shuffled.dtype == torch.bfloat16 and rows(shuffled) == rows(states)


def test_buffer_on_any_iterable_of_megabatches():
    megabatches = [torch.randn(2, 3, 4), {"states": torch.randn(1, 3, 4)}, torch.randn(5, 2, 4)]
    buffer = ActivaultS3ActivationBuffer(iter(megabatches), batch_size=8, seed=1)
    batches = list(buffer)
    assert [b.shape[0] for b in batches] == [8, 8, 3]
    expected = [m["states"] if isinstance(m, dict) else m for m in megabatches]
    assert rows(torch.cat(batches)) == rows(torch.cat([m.reshape(-1, 4) for m in expected]))
    with pytest.raises(ValueError, match="io must be"):
        ActivaultS3ActivationBuffer(iter([]), io="in_to_out")
    with pytest.raises(ValueError, match="batch_size"):
        ActivaultS3ActivationBuffer(iter([]), batch_size=0)
    with pytest.raises(ValueError, match="one d"):
        list(ActivaultS3ActivationBuffer(iter([torch.randn(1, 2, 4), torch.randn(1, 2, 3)]),
                                         batch_size=3))
    assert list(ActivaultS3ActivationBuffer(iter([]))) == []


def test_write_tensor_fills_a_free_slot():
    readable, writeable, ongoing = Queue(), Queue(), Value("i", 1)
    writeable.put(1)
    buffer = torch.zeros(2, 2, 3, 4)
    t = torch.randn(2, 3, 4)
    assert write_tensor(t, buffer, writeable, readable, ongoing)
    assert readable.get_nowait() == 1 and ongoing.value == 0
    assert torch.equal(buffer[1], t) and not buffer[0].any()
    slots = [SharedBuffer([2, 3, 4], [2, 3], torch.float32)]
    writeable.put(0)
    write_tensor({"states": t, "input_ids": torch.ones(2, 3, dtype=torch.long)}, slots, writeable,
                 readable, ongoing)
    assert torch.equal(slots[0]()["states"], t)
    writeable.put(0)
    with pytest.raises(ValueError, match=r"does not fit"):
        write_tensor(torch.randn(1, 3, 4), buffer, writeable, readable, ongoing)
    stop = Value("b", True)  # no free slot and stopping: gives up instead of blocking
    assert write_tensor(t, buffer, writeable, readable, ongoing, stop) is False


def test_s3_client_settings_come_from_the_environment(monkeypatch):
    pytest.importorskip("boto3")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID"):
        activault.create_s3_client()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with pytest.raises(ValueError, match="S3_ENDPOINT_URL"):
        activault.create_s3_client()
    monkeypatch.setenv("S3_ENDPOINT_URL", "https://storage.example.com")
    client = activault.create_s3_client()
    assert client.meta.endpoint_url == "https://storage.example.com"
    assert client.meta.config.s3["addressing_style"] == "path"
    assert (activault.create_s3_client(endpoint_url="https://other.example.com").meta.endpoint_url
            == "https://other.example.com")


def test_the_module_imports_without_boto3(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now fails
    monkeypatch.delitem(sys.modules, "dictionary_learning.activault_s3_buffer")
    import dictionary_learning.activault_s3_buffer as fresh

    assert fresh is not activault and fresh.MB == 1024 * 1024 and fresh.KB == 1024
    assert (fresh.OUTER_CACHE_DIR == fresh.INNER_CACHE_DIR == "cache"
            and isinstance(fresh.BUCKET_NAME, str))
    with pytest.raises(ImportError, match="boto3"):
        fresh.create_s3_client("key", "secret", "https://storage.example.com")
    with pytest.raises(ImportError, match="boto3"):
        fresh.S3RCache.from_credentials("key", "secret", PREFIX)


def test_ensure_spawn_context_sets_spawn(monkeypatch):
    calls = []
    monkeypatch.setattr(workers.mp, "get_start_method", lambda allow_none=False: "fork")
    monkeypatch.setattr(workers.mp, "set_start_method",
                        lambda method, force=False: calls.append((method, force)))
    activault.ensure_spawn_context()
    assert calls == [("spawn", True)]
