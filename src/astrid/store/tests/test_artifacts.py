"""Content-addressed artifact stores: a local folder and a real S3 server (moto)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest

from astrid.store.artifacts import (
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactKey,
    LocalArtifactStore,
    S3ArtifactStore,
    artifact_key,
    artifact_store_from_url,
    parse_artifact_key,
)
from astrid.store.tests.conftest import S3_CREDENTIALS

DATA = b"SIMPLE  =                    T" + bytes(range(256)) * 40


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    endpoint: str = request.getfixturevalue("s3_endpoint")
    bucket: str = request.getfixturevalue("s3_bucket")
    return S3ArtifactStore(
        bucket, prefix="run/artifacts", endpoint_url=endpoint, client_kwargs=S3_CREDENTIALS
    )


def test_keys() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    key = artifact_key(sha.upper(), "FITS")
    assert key == f"{sha[:2]}/{sha[2:4]}/{sha}.fits"
    assert parse_artifact_key(key) == (sha, ".fits")
    assert parse_artifact_key(artifact_key(sha, ".fits.fz")) == (sha, ".fits.fz")
    for bad in ("../etc/passwd", f"/{key}", f"00/00/{sha}.fits", f"{key}/..", sha):
        with pytest.raises(InvalidArtifactKey):
            parse_artifact_key(bad)
    with pytest.raises(InvalidArtifactKey):
        artifact_key(sha, ".fits/../x")


def test_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    sha = hashlib.sha256(DATA).hexdigest()
    key = store.put_bytes(DATA, ".fits")
    assert key == artifact_key(sha, ".fits")
    assert store.exists(key)
    assert store.get_bytes(key) == DATA
    # Storing the same content again is a no-op returning the same key.
    assert store.put_bytes(DATA, ".fits") == key

    source = tmp_path / "exposure.fits.fz"
    source.write_bytes(DATA)
    file_key = store.put_file(source)
    assert file_key == artifact_key(sha, ".fits.fz")
    assert store.put_file(source) == file_key
    assert store.put_file(source, suffix=".fits") == key

    with store.open(file_key) as stream:
        assert stream.read(6) == b"SIMPLE"
        stream.seek(0)
        assert stream.read() == DATA
    with store.local_path(key) as path:
        assert path.read_bytes() == DATA
        assert path.name.endswith(".fits")
    assert store.get_file(key, tmp_path / "copy.fits").read_bytes() == DATA
    assert store.verify(key)
    assert sorted(store.iter_keys()) == sorted([key, file_key])
    assert store.url(key).endswith(key)

    store.delete(key)
    store.delete(key)  # deleting twice is harmless
    assert not store.exists(key)
    assert store.exists(file_key)
    with pytest.raises(ArtifactNotFound):
        store.get_bytes(key)
    with pytest.raises(ArtifactNotFound):
        store.open(key)


def test_local_store_layout_and_atomic_writes(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    key = store.put_bytes(b"cutout", ".npy")
    path = store.path(key)
    assert path == tmp_path / key
    assert path.read_bytes() == b"cutout"
    # No temporary files are left behind, and the store can be rebuilt from its folder.
    assert list((tmp_path / ".incoming").iterdir()) == []
    assert list(LocalArtifactStore(tmp_path).iter_keys()) == [key]
    # A corrupted file is detected.
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    assert not store.verify(key)


def test_s3_objects_live_under_the_prefix(s3_endpoint: str, s3_bucket: str) -> None:
    store = S3ArtifactStore(
        s3_bucket, prefix="/deep/prefix/", endpoint_url=s3_endpoint, client_kwargs=S3_CREDENTIALS
    )
    key = store.put_bytes(b"difference", ".fits")
    listing = store.client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [item["Key"] for item in listing] == [f"deep/prefix/{key}"]
    head = store.client.head_object(Bucket=s3_bucket, Key=f"deep/prefix/{key}")
    assert head["Metadata"]["sha256"] == parse_artifact_key(key)[0]
    # A store can be pickled for worker processes; the client is rebuilt there.
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get_bytes(key) == b"difference"


def test_store_from_url(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    local = artifact_store_from_url((tmp_path / "a").as_uri())
    assert isinstance(local, LocalArtifactStore)
    assert local.root == (tmp_path / "a").resolve()
    plain = artifact_store_from_url(str(tmp_path / "b"))
    assert isinstance(plain, LocalArtifactStore)

    remote = artifact_store_from_url(
        f"s3://{s3_bucket}/some/prefix?endpoint_url={s3_endpoint}&region_name=us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    assert isinstance(remote, S3ArtifactStore)
    assert (remote.bucket, remote.prefix, remote.endpoint_url) == (
        s3_bucket,
        "some/prefix",
        s3_endpoint,
    )
    key = remote.put_bytes(b"from url")
    assert remote.get_bytes(key) == b"from url"
    assert remote.url() == f"s3://{s3_bucket}/some/prefix"

    with pytest.raises(ValueError, match="unknown S3 URL options"):
        artifact_store_from_url("s3://bucket/p?secret=1")
    with pytest.raises(ValueError, match="unsupported"):
        artifact_store_from_url("ftp://host/path")
