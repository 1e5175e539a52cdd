"""Content-addressed artifact storage: files named by the SHA-256 of their bytes.

Every file AstrID keeps (raw and calibrated exposures, references, difference images,
cutouts, models) is stored once under a key derived from its content::

    ab/cd/abcd1234...ef.fits        # sha256[0:2] / sha256[2:4] / sha256 + suffix

so storing the same bytes twice is a no-op that returns the same key, a key never
changes meaning, and a database row can hold the key instead of a path. The two-level
fan-out keeps folders small. The suffix (``.fits``, ``.fits.fz``, ``.png``; lower case)
only tells readers the format; it is part of the key.

Two stores implement :class:`ArtifactStore`: :class:`LocalArtifactStore` (a folder;
writes are atomic, via a temporary file and a rename) and :class:`S3ArtifactStore` (any
S3-compatible object store: AWS, MinIO, Cloudflare R2). Choose one from a URL with
:func:`artifact_store_from_url`. Credentials for S3 come from boto3's usual sources
(environment, config files, instance roles), never from the URL.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from astrid.errors import AstridError

__all__ = [
    "ArtifactNotFound",
    "ArtifactStore",
    "InvalidArtifactKey",
    "LocalArtifactStore",
    "S3ArtifactStore",
    "artifact_key",
    "artifact_store_from_url",
    "parse_artifact_key",
    "sha256_bytes",
    "sha256_file",
]

_CHUNK = 1024 * 1024
_SUFFIX_PART = r"\.[a-z0-9_]{1,16}"
_SUFFIX_RE = re.compile(rf"^(?:{_SUFFIX_PART}){{0,2}}$")
_KEY_RE = re.compile(
    rf"^(?P<a>[0-9a-f]{{2}})/(?P<b>[0-9a-f]{{2}})/(?P<sha>[0-9a-f]{{64}})"
    rf"(?P<suffix>(?:{_SUFFIX_PART}){{0,2}})$"
)
_COMPRESSION_SUFFIXES = {".gz", ".fz", ".bz2", ".xz", ".zst", ".zip"}
# Downloads for open() stay in memory up to this size, then spill to a temporary file.
_SPOOL_BYTES = 16 * 1024 * 1024


class InvalidArtifactKey(AstridError, ValueError):
    """A string is not a well-formed artifact key (or a suffix is not a valid suffix).

    Parameters
    ----------
    key : str
        The offending key or suffix.
    reason : str
        What is wrong with it.
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid artifact key {key!r}: {reason}")


class ArtifactNotFound(AstridError, LookupError):
    """No artifact is stored under a key.

    Parameters
    ----------
    key : str
        The key looked up.
    store : str
        Where it was looked for (the store's URL).
    """

    def __init__(self, key: str, store: str) -> None:
        self.key = key
        self.store = store
        super().__init__(f"no artifact {key!r} in {store}")


# --------------------------------------------------------------------------- keys


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise_suffix(suffix: str) -> str:
    suffix = suffix.lower()
    if suffix and not suffix.startswith("."):
        suffix = "." + suffix
    if not _SUFFIX_RE.match(suffix):
        raise InvalidArtifactKey(
            suffix, "a suffix is up to two parts like '.fits' or '.fits.fz' ([a-z0-9_])"
        )
    return suffix


def _suffix_of(path: Path) -> str:
    """Format suffix of a file name: the last extension, two for compressed files."""
    suffixes = [s.lower() for s in path.suffixes]
    if not suffixes:
        return ""
    if suffixes[-1] in _COMPRESSION_SUFFIXES and len(suffixes) >= 2:
        return "".join(suffixes[-2:])
    return suffixes[-1]


def artifact_key(sha256: str, suffix: str = "") -> str:
    """Key of the content with hex SHA-256 ``sha256``, e.g. ``ab/cd/abcd....fits``.

    Parameters
    ----------
    sha256 : str
        64 hex digits (upper case is lowered).
    suffix : str
        Format suffix, with or without the leading dot; ``""`` for none.
    """
    digest = sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise InvalidArtifactKey(sha256, "a SHA-256 is 64 hex digits")
    return f"{digest[:2]}/{digest[2:4]}/{digest}{_normalise_suffix(suffix)}"


def parse_artifact_key(key: str) -> tuple[str, str]:
    """``(sha256, suffix)`` of a key; raises :class:`InvalidArtifactKey` if malformed.

    The check also keeps keys from naming anything outside a store (no ``..``, no
    absolute paths).
    """
    match = _KEY_RE.match(key)
    if match is None:
        raise InvalidArtifactKey(key, "expected 'xx/yy/<64 hex digits><suffix>'")
    sha = match["sha"]
    if match["a"] != sha[:2] or match["b"] != sha[2:4]:
        raise InvalidArtifactKey(key, "folders do not match the hash")
    return sha, match["suffix"]


# --------------------------------------------------------------------------- interface


class ArtifactStore(ABC):
    """Where artifact files live; keys are content hashes (see the module docs).

    Every ``put_*`` is idempotent: storing content that is already there does nothing
    and returns the same key.
    """

    @abstractmethod
    def put_bytes(self, data: bytes, suffix: str = "") -> str:
        """Store ``data`` and return its key.

        Parameters
        ----------
        data : bytes
            Content to store.
        suffix : str
            Format suffix of the key (``".fits"``); ``""`` for none.
        """

    @abstractmethod
    def put_file(self, path: str | os.PathLike[str], suffix: str | None = None) -> str:
        """Store a file's content and return its key.

        Parameters
        ----------
        path : str or path-like
            File to store (read in chunks; any size).
        suffix : str or None
            Format suffix of the key; ``None`` takes it from the file name (the last
            extension, or the last two for compressed files such as ``.fits.fz``).
        """

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The content stored under ``key`` (raises :class:`ArtifactNotFound`)."""

    @abstractmethod
    def open(self, key: str) -> IO[bytes]:
        """A seekable binary file object of the content; the caller closes it."""

    @abstractmethod
    def local_path(self, key: str) -> AbstractContextManager[Path]:
        """A context manager giving a local file with the content (for FITS readers).

        For a local store it is the stored file itself (do not modify it); for a remote
        store, a temporary copy deleted when the block exits.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether content is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the content under ``key``; removing an absent key does nothing."""

    @abstractmethod
    def iter_keys(self) -> Iterator[str]:
        """Every key in the store, in no particular order."""

    @abstractmethod
    def url(self, key: str | None = None) -> str:
        """URL of the store (``key=None``) or of one artifact in it."""

    def get_file(self, key: str, destination: str | os.PathLike[str]) -> Path:
        """Copy the content under ``key`` to ``destination`` and return that path."""
        target = Path(destination)
        with self.open(key) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, _CHUNK)
        return target

    def verify(self, key: str) -> bool:
        """Whether the stored content still hashes to the SHA-256 in its key."""
        sha, _ = parse_artifact_key(key)
        digest = hashlib.sha256()
        with self.open(key) as stream:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest() == sha

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url()!r})"


# --------------------------------------------------------------------------- local


class LocalArtifactStore(ArtifactStore):
    """Artifacts in a folder, as ``<root>/ab/cd/<sha256><suffix>``.

    Writes go to a temporary file in ``<root>/.incoming`` and are renamed into place
    (atomic on one file system), so a reader never sees a partial file and concurrent
    writers of the same content are harmless.

    Parameters
    ----------
    root : str or path-like
        The folder; created if absent.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._incoming = self.root / ".incoming"

    def path(self, key: str) -> Path:
        """Where the content of ``key`` is (or would be) stored."""
        parse_artifact_key(key)
        return self.root / key

    def _existing_path(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise ArtifactNotFound(key, self.url())
        return path

    def _commit(self, temporary: Path, key: str) -> None:
        target = self.path(key)
        if target.is_file():
            temporary.unlink()
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.chmod(0o644)
        os.replace(temporary, target)

    def _temporary(self) -> tuple[int, Path]:
        self._incoming.mkdir(exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self._incoming, prefix="put-")
        return handle, Path(name)

    def put_bytes(self, data: bytes, suffix: str = "") -> str:
        key = artifact_key(sha256_bytes(data), suffix)
        if self.path(key).is_file():
            return key
        handle, temporary = self._temporary()
        try:
            with os.fdopen(handle, "wb") as sink:
                sink.write(data)
                sink.flush()
                os.fsync(sink.fileno())
            self._commit(temporary, key)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return key

    def put_file(self, path: str | os.PathLike[str], suffix: str | None = None) -> str:
        source_path = Path(path)
        normalised = _normalise_suffix(_suffix_of(source_path) if suffix is None else suffix)
        handle, temporary = self._temporary()
        try:
            digest = hashlib.sha256()
            with open(source_path, "rb") as source, os.fdopen(handle, "wb") as sink:
                for chunk in iter(lambda: source.read(_CHUNK), b""):
                    digest.update(chunk)
                    sink.write(chunk)
                sink.flush()
                os.fsync(sink.fileno())
            key = artifact_key(digest.hexdigest(), normalised)
            self._commit(temporary, key)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return key

    def get_bytes(self, key: str) -> bytes:
        return self._existing_path(key).read_bytes()

    def open(self, key: str) -> IO[bytes]:
        return open(self._existing_path(key), "rb")

    @contextmanager
    def _local_path(self, key: str) -> Iterator[Path]:
        yield self._existing_path(key)

    def local_path(self, key: str) -> AbstractContextManager[Path]:
        return self._local_path(key)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def iter_keys(self) -> Iterator[str]:
        for path in self.root.glob("??/??/*"):
            key = path.relative_to(self.root).as_posix()
            if _KEY_RE.match(key) and path.is_file():
                yield key

    def url(self, key: str | None = None) -> str:
        if key is None:
            return self.root.as_uri()
        return self.path(key).as_uri()


# --------------------------------------------------------------------------- S3


class S3ArtifactStore(ArtifactStore):
    """Artifacts as objects ``<prefix>/ab/cd/<sha256><suffix>`` in an S3-compatible bucket.

    The boto3 client is created on first use (and again after unpickling, so a store
    can be sent to worker processes).

    Parameters
    ----------
    bucket : str
        Bucket name; it must exist.
    prefix : str
        Key prefix inside the bucket (``"astrid/artifacts"``); ``""`` for the root.
    endpoint_url : str or None
        Endpoint of a non-AWS service (``http://127.0.0.1:9000`` for MinIO,
        ``https://<account>.r2.cloudflarestorage.com``); ``None`` for AWS. With an
        endpoint, path-style addressing is used unless ``client_kwargs`` sets a config.
    client_kwargs : dict or None
        Further arguments of ``boto3.client("s3", ...)`` (``region_name``,
        ``aws_access_key_id``, ``config``, ...).
    client : botocore client or None
        A ready client to use instead (it is not pickled).
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        client_kwargs: dict[str, Any] | None = None,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client_kwargs = dict(client_kwargs or {})
        self._client = client

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            kwargs = dict(self.client_kwargs)
            if self.endpoint_url is not None:
                kwargs.setdefault("config", Config(s3={"addressing_style": "path"}))
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, **kwargs
            )
        return self._client

    def object_name(self, key: str) -> str:
        """Object key in the bucket of the artifact ``key``."""
        parse_artifact_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _is_missing(error: Exception) -> bool:
        response = getattr(error, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        return code in {"404", "NoSuchKey", "NotFound"}

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_name(key))
        except ClientError as error:
            if self._is_missing(error):
                return False
            raise
        return True

    def put_bytes(self, data: bytes, suffix: str = "") -> str:
        sha = sha256_bytes(data)
        key = artifact_key(sha, suffix)
        if not self.exists(key):
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.object_name(key),
                Body=data,
                Metadata={"sha256": sha},
            )
        return key

    def put_file(self, path: str | os.PathLike[str], suffix: str | None = None) -> str:
        source_path = Path(path)
        sha = sha256_file(source_path)
        key = artifact_key(sha, _suffix_of(source_path) if suffix is None else suffix)
        if not self.exists(key):
            # upload_file switches to multipart uploads for large files.
            self.client.upload_file(
                str(source_path),
                self.bucket,
                self.object_name(key),
                ExtraArgs={"Metadata": {"sha256": sha}},
            )
        return key

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_name(key))
        except ClientError as error:
            if self._is_missing(error):
                raise ArtifactNotFound(key, self.url()) from error
            raise
        body = response["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def _download(self, key: str, sink: IO[bytes]) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_fileobj(self.bucket, self.object_name(key), sink)
        except ClientError as error:
            if self._is_missing(error):
                raise ArtifactNotFound(key, self.url()) from error
            raise

    def open(self, key: str) -> IO[bytes]:
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        try:
            self._download(key, spool)
        except BaseException:
            spool.close()
            raise
        spool.seek(0, io.SEEK_SET)
        return spool

    @contextmanager
    def _local_path(self, key: str) -> Iterator[Path]:
        _, suffix = parse_artifact_key(key)
        with tempfile.TemporaryDirectory(prefix="astrid-artifact-") as folder:
            path = Path(folder) / f"artifact{suffix}"
            with open(path, "wb") as sink:
                self._download(key, sink)
            yield path

    def local_path(self, key: str) -> AbstractContextManager[Path]:
        return self._local_path(key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_name(key))

    def iter_keys(self) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        start = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                key = str(item["Key"])[len(start) :]
                if _KEY_RE.match(key):
                    yield key

    def url(self, key: str | None = None) -> str:
        base = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return base if key is None else f"{base}/{key}"


# --------------------------------------------------------------------------- factory

_S3_URL_OPTIONS = {"endpoint_url", "region_name"}


def artifact_store_from_url(url: str, **client_kwargs: Any) -> ArtifactStore:
    """The artifact store a URL names.

    Parameters
    ----------
    url : str
        ``file:///absolute/folder``, a plain folder path (relative to the working
        directory), or ``s3://bucket/optional/prefix`` with optional query parameters
        ``endpoint_url`` (percent-encoded) and ``region_name``, e.g.
        ``s3://astrid/artifacts?endpoint_url=http%3A//127.0.0.1%3A9000``.
    **client_kwargs
        Extra ``boto3.client`` arguments for S3 stores (credentials are better left to
        the environment).

    Returns
    -------
    ArtifactStore
        A :class:`LocalArtifactStore` or :class:`S3ArtifactStore`.

    Raises
    ------
    ValueError
        For an unsupported scheme, a missing bucket or an unknown query parameter.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return LocalArtifactStore(url)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URLs must name a local folder, got host {parts.netloc!r}")
        return LocalArtifactStore(unquote(parts.path))
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"no bucket in {url!r}; expected s3://bucket/prefix")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - _S3_URL_OPTIONS
        if unknown:
            raise ValueError(
                f"unknown S3 URL options {sorted(unknown)}; allowed: {sorted(_S3_URL_OPTIONS)}"
            )
        kwargs = dict(client_kwargs)
        if "region_name" in options:
            kwargs.setdefault("region_name", options["region_name"])
        return S3ArtifactStore(
            parts.netloc,
            prefix=unquote(parts.path),
            endpoint_url=options.get("endpoint_url") or None,
            client_kwargs=kwargs,
        )
    raise ValueError(f"unsupported artifact store URL scheme {scheme!r} in {url!r}")
