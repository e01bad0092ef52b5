"""duch_core.storage against local directories and a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest

from duch_core import pointers, storage, storage_errors, storage_retry


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh empty root: a local directory or an S3 prefix (both without trailing slash)."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_prefix").rstrip("/")


@pytest.fixture
def boto(s3_server):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


# --------------------------------------------------------------------------------------------
# URIs (no server needed)


def test_join():
    assert storage.join("s3://b/x/", "/y", "z.json") == "s3://b/x/y/z.json"
    assert storage.join("s3://b", "a/b/", "c") == "s3://b/a/b/c"
    assert storage.join("/data", "a", "", "b") == "/data/a/b"
    assert storage.join("/", "a") == "/a"
    assert storage.join("rel/dir/", "f.txt") == "rel/dir/f.txt"
    assert storage.join("file:///tmp/x", "y") == "file:///tmp/x/y"
    assert storage.join("s3://b/x") == "s3://b/x"


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "   ",
        "s3://",
        "s3:///key",
        "ftp://x",
        "gs://b/k",
        "s3://B_ad/k",
        "s3://b/a//c",
        "s3:/bucket/key",
        "file://host/x",
        "s3://ok-bucket/k?x=1",
    ],
)
def test_bad_uris(uri):
    with pytest.raises(storage.BadURIError) as ei:
        storage.read_bytes(uri)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, storage.StorageError)
    with pytest.raises(storage.BadURIError):
        storage.resolve(uri)


def test_bad_uri_types_and_join():
    with pytest.raises(storage.BadURIError):
        storage.join("", "a")
    with pytest.raises(storage.BadURIError):
        storage.join("ftp://x", "a")
    with pytest.raises(storage.BadURIError):
        storage.resolve(None)  # type: ignore[arg-type]


def test_resolve_and_is_s3(tmp_path, s3_server):
    fs, path = storage.resolve(str(tmp_path / "a" / "b.txt"))
    assert fs.type_name == "local" and path == str(tmp_path / "a" / "b.txt")
    fs2, path2 = storage.resolve("file://" + str(tmp_path) + "/sp%20ace.txt")
    assert fs2.type_name == "local" and path2 == str(tmp_path / "sp ace.txt")
    fs3, path3 = storage.resolve("s3://test/x/y/")
    assert fs3.type_name == "s3" and path3 == "test/x/y"
    assert storage.resolve("s3://test/z")[0] is fs3  # cached per settings
    assert storage.is_s3("s3://test/x") and storage.is_s3("S3://test/x")
    assert not storage.is_s3("/tmp/x") and not storage.is_s3("file:///x")


def test_error_hierarchy():
    assert issubclass(storage.NotFoundError, FileNotFoundError)
    assert issubclass(storage.AccessDeniedError, PermissionError)
    assert issubclass(storage.BadURIError, ValueError)
    for cls in (storage.NotFoundError, storage.AccessDeniedError, storage.BadURIError):
        assert issubclass(cls, storage.StorageError)


# --------------------------------------------------------------------------------------------
# round trips


def test_round_trips(root):
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    storage.write_bytes(storage.join(root, "b", "blob.bin"), blob)
    assert storage.read_bytes(storage.join(root, "b", "blob.bin")) == blob
    storage.write_bytes(storage.join(root, "empty"), b"")
    assert storage.read_bytes(storage.join(root, "empty")) == b""
    text = "Flugfeld \u00e9t\u00e9 \u6c34 \U0001f30d\nline 2"
    storage.write_text(storage.join(root, "t.txt"), text)
    assert storage.read_text(storage.join(root, "t.txt")) == text
    obj = {"a": [1, 2.5, None, True], "b": {"c": "\u00fc"}, "n": 2**40}
    storage.write_json(storage.join(root, "o.json"), obj)
    assert storage.read_json(storage.join(root, "o.json")) == obj
    table = pa.table(
        {
            "id": pa.array([f"item{i}" for i in range(1000)]),
            "code": pa.array(rng.integers(0, 2**63, 1000, dtype=np.uint64)),
            "caps": pa.array([["x", "y"][: i % 3] for i in range(1000)], pa.list_(pa.string())),
        }
    )
    storage.write_parquet(storage.join(root, "t.parquet"), table)
    got = storage.read_parquet(storage.join(root, "t.parquet"))
    assert got.equals(table)
    assert storage.read_parquet(storage.join(root, "t.parquet"), columns=["id"]).column_names == [
        "id"
    ]
    # overwrite replaces the content
    storage.write_bytes(storage.join(root, "b", "blob.bin"), b"new")
    assert storage.read_bytes(storage.join(root, "b", "blob.bin")) == b"new"
    with storage.open_input(storage.join(root, "t.parquet")) as f:
        assert f.size() == storage.info(storage.join(root, "t.parquet")).size
        f.seek(f.size() - 4)
        assert f.read(4) == b"PAR1"


def test_info_and_exists(root):
    uri = storage.join(root, "d", "x.bin")
    assert not storage.exists(uri)
    before = time.time_ns()
    storage.write_bytes(uri, b"0123456789")
    inf = storage.info(uri)
    assert inf.size == 10
    assert inf.mtime_ns is not None and abs(inf.mtime_ns - before) < 120 * 10**9
    if storage.is_s3(uri):
        assert inf.etag
        storage.write_bytes(uri, b"abcdefghij")
        assert storage.info(uri).etag != inf.etag
    else:
        assert inf.etag is None
    assert storage.exists(uri)
    assert storage.exists(storage.join(root, "d"))  # a directory / non-empty prefix
    with pytest.raises(storage.NotFoundError):
        storage.info(storage.join(root, "d"))
    with pytest.raises(storage.NotFoundError):
        storage.info(storage.join(root, "d", "missing.bin"))


def test_listing(root):
    names = ["a.txt", "b/c.txt", "b/d/e.txt", "b/d/f.txt", "z.bin", "b0.txt"]
    for n in reversed(names):
        storage.write_bytes(storage.join(root, n), n.encode())
    everything = storage.list_prefix(root)
    assert everything == sorted(storage.join(root, n) for n in names)
    assert storage.list_prefix(root + "/") == everything
    assert storage.list_prefix(root, recursive=False) == sorted(
        storage.join(root, n) for n in ("a.txt", "z.bin", "b0.txt")
    )
    # directory semantics: "b" does not match "b0.txt"
    assert storage.list_prefix(storage.join(root, "b")) == [
        storage.join(root, n) for n in ("b/c.txt", "b/d/e.txt", "b/d/f.txt")
    ]
    assert storage.list_prefix(storage.join(root, "b", "d"), recursive=False) == [
        storage.join(root, "b/d/e.txt"),
        storage.join(root, "b/d/f.txt"),
    ]
    assert storage.list_prefix(storage.join(root, "nothing")) == []
    assert storage.list_prefix(storage.join(root, "a.txt")) == []
    for uri in everything:
        assert storage.read_bytes(uri) == uri[len(root) + 1 :].encode()


def test_relative_local_paths_list_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("rel/x/1.txt", b"1")
    assert storage.list_prefix("rel") == ["rel/x/1.txt"]
    assert storage.list_prefix("file://" + str(tmp_path / "rel")) == [
        "file://" + str(tmp_path / "rel" / "x" / "1.txt")
    ]


def test_delete_and_delete_prefix(root):
    for n in ("k/a", "k/b/c", "k2/a", "keep"):
        storage.write_bytes(storage.join(root, n), b"x")
    storage.delete(storage.join(root, "k2/a"))
    assert not storage.exists(storage.join(root, "k2/a"))
    with pytest.raises(storage.NotFoundError):
        storage.delete(storage.join(root, "k2/a"))
    storage.delete(storage.join(root, "k2/a"), missing_ok=True)
    storage.delete_prefix(storage.join(root, "k"))
    assert storage.list_prefix(root) == [storage.join(root, "keep")]
    assert not storage.exists(storage.join(root, "k"))
    storage.delete_prefix(storage.join(root, "k"))  # missing: no error
    storage.delete_prefix(storage.join(root, "never"))


def test_delete_prefix_refuses_roots(s3_server):
    with pytest.raises(storage.BadURIError):
        storage.delete_prefix(f"s3://{s3_server.bucket}/")
    with pytest.raises(storage.BadURIError):
        storage.delete_prefix("/")


def test_missing_objects(root):
    for fn in (
        storage.read_bytes,
        storage.read_text,
        storage.read_json,
        storage.read_parquet,
        storage.open_input,
        storage.info,
        pointers.read_pointer,
    ):
        with pytest.raises(storage.NotFoundError) as ei:
            fn(storage.join(root, "no", "such.thing"))
        assert "such.thing" in str(ei.value)
        assert isinstance(ei.value, FileNotFoundError)


def test_missing_bucket(s3_server):
    bucket = f"nobucket-{uuid.uuid4().hex[:12]}"
    uri = f"s3://{bucket}/x/y.bin"
    for call in (
        lambda: storage.read_bytes(uri),
        lambda: storage.info(uri),
        lambda: storage.write_bytes(uri, b"data"),
        lambda: storage.list_prefix(f"s3://{bucket}/x"),
    ):
        with pytest.raises(storage.NotFoundError, match="does not exist"):
            call()
    assert not storage.exists(uri)


# --------------------------------------------------------------------------------------------
# large objects and concurrency


def test_large_multipart_object(root):
    rng = np.random.default_rng(1)
    chunk = rng.integers(0, 256, 3 * 1024 * 1024 + 17, dtype=np.uint8).tobytes()
    n = 6  # about 18 MiB, several multipart parts
    h = hashlib.sha256()
    uri = storage.join(root, "big", "stream.bin")
    with storage.open_output(uri) as f:
        for i in range(n):
            piece = bytes([i]) + chunk
            h.update(piece)
            f.write(piece)
    assert storage.info(uri).size == n * (len(chunk) + 1) > 16 * 1024 * 1024
    with storage.open_input(uri) as f:
        got = hashlib.sha256()
        while block := f.read(5 * 1024 * 1024):
            got.update(block)
        f.seek(len(chunk) + 1)
        assert f.read(1) == bytes([1])
    assert got.hexdigest() == h.hexdigest()
    blob = chunk * 6
    storage.write_bytes(storage.join(root, "big", "one.bin"), blob)
    assert storage.read_bytes(storage.join(root, "big", "one.bin")) == blob


def test_failed_stream_write_publishes_nothing(root):
    uri = storage.join(root, "partial.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_output(uri) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("boom")
    assert not storage.exists(uri)
    assert storage.list_prefix(root) == []
    # the old object survives an aborted rewrite, locally and on S3
    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_output(uri) as f:
            f.write(b"new")
            raise RuntimeError("boom")
    assert storage.read_bytes(uri) == b"old"
    assert storage.list_prefix(root) == [uri]


def _fast_retries(monkeypatch, attempts: int = 3) -> None:
    monkeypatch.setenv("DUCH_S3_ATTEMPTS", str(attempts))
    monkeypatch.setenv("DUCH_S3_BACKOFF_S", "0.01")
    monkeypatch.setenv("DUCH_S3_BACKOFF_MAX_S", "0.02")


def test_failed_s3_writes_never_delete_the_object_or_the_pointer(s3_prefix, monkeypatch):
    """A PUT that keeps failing (the store down): the old object and pointer stay as they were."""
    uri, ptr = storage.join(s3_prefix, "obj.bin"), storage.join(s3_prefix, "LATEST")
    storage.write_bytes(uri, b"old")
    pointers.publish_pointer(ptr, "v1")
    _fast_retries(monkeypatch)
    calls = []
    real = storage_retry.boto_call

    def failing(u: str, action: str, call):  # noqa: ANN001, ANN202
        if action == "write":
            calls.append(u)
            raise storage.TransientStorageError(f"{u}: SlowDown (HTTP 503)")
        return real(u, action, call)

    monkeypatch.setattr(storage_retry, "boto_call", failing)
    with pytest.raises(storage.TransientStorageError, match="after 3 tries"):
        storage.write_bytes(uri, b"new")
    with pytest.raises(storage.TransientStorageError):
        with storage.open_output(uri) as f:
            f.write(b"new, streamed")
    with pytest.raises(storage.TransientStorageError):
        pointers.publish_pointer(ptr, "v2")
    assert len(calls) == 9  # three tries each
    monkeypatch.setattr(storage_retry, "boto_call", real)
    assert storage.read_bytes(uri) == b"old"
    assert pointers.read_pointer(ptr) == "v1"


def test_transient_failures_are_retried_others_are_not(monkeypatch):
    _fast_retries(monkeypatch, attempts=4)
    storage_retry._breaker["exhausted"] = 0
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: injected")
        return "ok"

    assert storage_retry.retrying(flaky, "s3://b/k", "read") == "ok" and calls["n"] == 3

    def missing() -> None:
        calls["n"] += 1
        raise storage.NotFoundError("s3://b/k: no such object")

    calls["n"] = 0
    with pytest.raises(storage.NotFoundError):
        storage_retry.retrying(missing, "s3://b/k", "read")
    assert calls["n"] == 1

    def down() -> None:
        calls["n"] += 1
        raise OSError("AWS Error NETWORK_CONNECTION: curlCode: 7, Couldn't connect to server")

    calls["n"] = 0
    with pytest.raises(storage.TransientStorageError, match="after 4 tries"):
        storage_retry.retrying(down, "s3://b/k", "read")
    assert calls["n"] == 4
    # a long outage: after BREAKER_THRESHOLD exhausted operations the next ones try once
    try:
        for _ in range(storage_retry.BREAKER_THRESHOLD):
            with pytest.raises(storage.TransientStorageError):
                storage_retry.retrying(down, "s3://b/k", "read")
        calls["n"] = 0
        with pytest.raises(storage.TransientStorageError):
            storage_retry.retrying(down, "s3://b/k", "read")
        assert calls["n"] == 1
        calls["n"] = 2
        assert storage_retry.retrying(flaky, "s3://b/k", "read") == "ok"  # a success closes it
        calls["n"] = 0
        with pytest.raises(storage.TransientStorageError):
            storage_retry.retrying(down, "s3://b/k", "read")
        assert calls["n"] == 4
    finally:
        storage_retry._breaker["exhausted"] = 0


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        (
            "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.",
            True,
        ),
        ("AWS Error UNKNOWN (HTTP status 500) during HeadObject operation", True),
        ("AWS Error SLOW_DOWN during PutObject operation: injected", True),
        ("AWS Error INTERNAL_FAILURE during ListObjectsV2 operation", True),
        ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 56, reset", True),
        ("curlCode: 28, Timeout was reached", True),
        ("AWS Error ACCESS_DENIED during HeadObject operation: HTTP response code: 403", False),
        ("Path does not exist 'test/x'", False),
        ("Parquet magic bytes not found in footer", False),
    ],
)
def test_transient_classification(message, transient):
    assert storage_errors.is_transient(OSError(message)) is transient
    assert storage_errors.is_transient(ConnectionResetError("reset by peer"))
    assert not storage_errors.is_transient(storage.NotFoundError("x"))


def test_conditional_requests(root):
    uri = storage.join(root, "lock")
    with pytest.raises(storage.NotFoundError):
        pointers.read_versioned(uri)
    e1 = pointers.put_conditional(uri, b"one", if_none_match=True)
    with pytest.raises(storage.PreconditionFailedError):
        pointers.put_conditional(uri, b"two", if_none_match=True)
    got = pointers.read_versioned(uri)
    assert got == pointers.Versioned(b"one", e1)
    e2 = pointers.put_conditional(uri, b"two", if_match=e1)
    assert e2 != e1
    with pytest.raises(storage.PreconditionFailedError):
        pointers.put_conditional(uri, b"three", if_match=e1)  # stale
    with pytest.raises(storage.PreconditionFailedError):
        pointers.delete_conditional(uri, e1)
    assert storage.read_bytes(uri) == b"two"
    pointers.delete_conditional(uri, e2)
    assert not storage.exists(uri)
    pointers.delete_conditional(uri, e2)  # missing: nothing to do
    with pytest.raises(ValueError):
        pointers.put_conditional(uri, b"x", if_match=e1, if_none_match=True)


def test_conditional_put_that_landed_before_a_lost_answer_succeeds(s3_prefix, monkeypatch):
    """The answer of a conditional PUT is lost after the write landed: the retry's 412 is
    recognised as this write (the content is there), not as another writer's."""
    _fast_retries(monkeypatch)
    uri = storage.join(s3_prefix, "ptr")
    first = pointers.put_conditional(uri, b"v1")
    real = storage_retry.boto_call
    lost = {"n": 0}

    def lose_first_answer(u: str, action: str, call):  # noqa: ANN001, ANN202
        out = real(u, action, call)
        if action == "write" and lost["n"] == 0:
            lost["n"] += 1
            raise storage.TransientStorageError(f"{u}: connection reset")
        return out

    monkeypatch.setattr(storage_retry, "boto_call", lose_first_answer)
    etag = pointers.put_conditional(uri, b"v2", if_match=first)
    assert pointers.read_versioned(uri) == pointers.Versioned(b"v2", etag)
    with pytest.raises(storage.PreconditionFailedError):  # a real conflict stays one
        pointers.put_conditional(uri, b"v3", if_match=first)


def test_concurrent_writers(root):
    n_threads, per_thread = 8, 6
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                data = f"{t}-{i}-".encode() * (100 + 37 * i)
                storage.write_bytes(storage.join(root, f"w{t}", f"{i:03d}.bin"), data)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    listed = storage.list_prefix(root)
    assert len(listed) == n_threads * per_thread
    for t in range(n_threads):
        for i in range(per_thread):
            uri = storage.join(root, f"w{t}", f"{i:03d}.bin")
            assert storage.read_bytes(uri) == f"{t}-{i}-".encode() * (100 + 37 * i)


# --------------------------------------------------------------------------------------------
# publish / pointer


def test_publish_pointer_semantics(root):
    ptr = storage.join(root, "LATEST")
    with pytest.raises(storage.NotFoundError):
        pointers.read_pointer(ptr)
    versions = [f"v{i:04d}-" + "x" * (i % 7) * 9 for i in range(30)]
    storage.write_json(storage.join(root, "versions", versions[0], "index.json"), {"v": 0})
    pointers.publish_pointer(ptr, versions[0])
    assert pointers.read_pointer(ptr) == versions[0]

    seen: set[str] = set()
    bad: list[object] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                v = pointers.read_pointer(ptr)
            except BaseException as e:  # noqa: BLE001 - reported below
                bad.append(e)
                return
            if v not in versions:
                bad.append(v)
                return
            # data objects were written before the pointer: they must be there
            if not storage.exists(storage.join(root, "versions", v, "index.json")):
                bad.append(("dangling", v))
            seen.add(v)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for th in readers:
        th.start()
    try:
        for i, v in enumerate(versions[1:], start=1):
            storage.write_json(storage.join(root, "versions", v, "index.json"), {"v": i})
            pointers.publish_pointer(ptr, v)
    finally:
        stop.set()
        for th in readers:
            th.join()
    assert not bad, bad[:3]
    assert len(seen) > 1
    assert pointers.read_pointer(ptr) == versions[-1]
    assert storage.read_bytes(ptr) == versions[-1].encode()
    # no temporary objects are left behind or listed
    assert storage.list_prefix(root, recursive=False) == [ptr]
    if not storage.is_s3(root):
        assert os.listdir(root) == ["LATEST", "versions"] or sorted(os.listdir(root)) == [
            "LATEST",
            "versions",
        ]


@pytest.mark.parametrize("value", ["", " v1", "v1\n", "a\nb", "x" * 2000])
def test_publish_pointer_rejects_bad_values(tmp_path, value):
    with pytest.raises(ValueError):
        pointers.publish_pointer(str(tmp_path / "LATEST"), value)
    assert not (tmp_path / "LATEST").exists()


def test_empty_pointer_is_an_error(root):
    storage.write_bytes(storage.join(root, "P"), b"")
    with pytest.raises(storage.StorageError, match="empty"):
        pointers.read_pointer(storage.join(root, "P"))


# --------------------------------------------------------------------------------------------
# S3 specifics


def test_boto3_sees_the_same_bytes(s3_prefix, boto):
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, 1234, dtype=np.uint8).tobytes()
    big = rng.integers(0, 256, 17 * 1024 * 1024, dtype=np.uint8).tobytes()
    storage.write_bytes(storage.join(s3_prefix, "s.bin"), small)
    with storage.open_output(storage.join(s3_prefix, "big.bin")) as f:
        for off in range(0, len(big), 4 * 1024 * 1024):
            f.write(big[off : off + 4 * 1024 * 1024])
    pointers.publish_pointer(storage.join(s3_prefix, "LATEST"), "v1")
    bucket, key = _split(s3_prefix)
    for name, data in (("s.bin", small), ("big.bin", big), ("LATEST", b"v1")):
        obj = boto.get_object(Bucket=bucket, Key=key + name)
        assert obj["Body"].read() == data
        assert obj["ContentLength"] == len(data)
        assert storage.info(storage.join(s3_prefix, name)).etag == obj["ETag"].strip('"')
    listed = boto.list_objects_v2(Bucket=bucket, Prefix=key)
    keys = sorted(o["Key"] for o in listed["Contents"] if not o["Key"].endswith("/"))
    assert keys == sorted(key + n for n in ("s.bin", "big.bin", "LATEST"))
    # and the other way round
    boto.put_object(Bucket=bucket, Key=key + "from-boto/x.json", Body=b'{"a": 1}')
    assert storage.read_json(storage.join(s3_prefix, "from-boto", "x.json")) == {"a": 1}
    assert storage.join(s3_prefix, "from-boto", "x.json") in storage.list_prefix(s3_prefix)


def test_wrong_credentials(s3_prefix):
    uri = storage.join(s3_prefix, "secret.bin")
    storage.write_bytes(uri, b"payload")
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    try:
        storage.configure_s3(
            endpoint=endpoint, access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key="wrong-secret"
        )
        for call in (
            lambda: storage.read_bytes(uri),
            lambda: storage.info(uri),
            lambda: storage.write_bytes(storage.join(s3_prefix, "other.bin"), b"x"),
            lambda: storage.list_prefix(s3_prefix),
        ):
            with pytest.raises(storage.AccessDeniedError) as ei:
                call()
            assert isinstance(ei.value, PermissionError)
        storage.configure_s3(access_key="unknown-key", secret_key="whatever")
        with pytest.raises(storage.AccessDeniedError):
            storage.read_bytes(uri)
    finally:
        storage.configure_s3()
    assert storage.read_bytes(uri) == b"payload"
    assert not storage.exists(storage.join(s3_prefix, "other.bin"))


def test_wrong_credentials_boto3(s3_server, s3_prefix):
    import boto3
    from botocore.exceptions import ClientError

    storage.write_bytes(storage.join(s3_prefix, "a"), b"a")
    bad = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="nope",
        region_name=s3_server.region,
    )
    bucket, key = _split(s3_prefix)
    with pytest.raises(ClientError) as ei:
        bad.get_object(Bucket=bucket, Key=key + "a")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_endpoint_from_environment(s3_prefix, monkeypatch):
    uri = storage.join(s3_prefix, "env.txt")
    storage.write_text(uri, "via env")
    # an endpoint given without a trailing slash or with one is the same store
    monkeypatch.setenv("AWS_ENDPOINT_URL", os.environ["AWS_ENDPOINT_URL"] + "/")
    assert storage.read_text(uri) == "via env"
    # a store that is not there: a clear, transient StorageError after the retries, not a hang
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    _fast_retries(monkeypatch, attempts=2)
    with pytest.raises(storage.TransientStorageError):
        storage.read_text(uri)
    with pytest.raises(storage.TransientStorageError):
        storage.write_text(uri, "x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://127.0.0.1:9/x")
    with pytest.raises(storage.BadURIError):
        storage.read_text(uri)
    with pytest.raises(storage.BadURIError):
        storage.configure_s3(endpoint="http://host/with/path")


def test_s3_server_fixture(s3_server):
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    assert os.environ["AWS_REGION"] == os.environ["AWS_DEFAULT_REGION"] == s3_server.region
    assert s3_server.start_s < 30
    print(f"weed mini ready in {s3_server.start_s:.2f} s")


# --------------------------------------------------------------------------------------------
# version ids


def test_new_version_ids_sort_by_creation_time_and_are_unique():
    from datetime import UTC, datetime, timedelta, timezone

    t = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    vid = pointers.new_version_id(t)
    assert re.fullmatch(r"20240506T070809123456Z-[0-9a-f]{8}", vid), vid
    # a zone-aware time elsewhere is converted to UTC
    local = t.astimezone(timezone(timedelta(hours=5)))
    assert pointers.new_version_id(local).split("-")[0] == vid.split("-")[0]
    # one microsecond later sorts later whatever the random suffixes are
    later = [pointers.new_version_id(t + timedelta(microseconds=1)) for _ in range(20)]
    same = [pointers.new_version_id(t) for _ in range(20)]
    assert all(a < b for a in same for b in later)
    assert len(set(same)) == len(same)
    # the default is now, and a valid pointer value
    assert pointers.new_version_id() > vid
    pointers._check_pointer_value(pointers.new_version_id())
