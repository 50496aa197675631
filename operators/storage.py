"""Where data lives: local paths, ``s3://`` (AWS, MinIO, Ceph, R2 ...) and the other schemes pyarrow knows.

One filesystem layer for the data path: pyarrow's ``S3FileSystem``. It is what Ray Data's readers and
``pyarrow.parquet`` use natively (no Python-level fsspec shim per byte), it reads and writes from C++ threads
outside the GIL, its multipart uploads only become visible when complete (an object is there whole or not at
all, which the commit protocol in ``operators.ledger`` relies on), and its AWS SDK retry strategy gives bounded
retries with exponential backoff and jitter for 500/503/SlowDown/connection errors. s3fs would add a second
stack of retries and an event loop in every Ray worker for nothing this project needs.

Credentials are never passed explicitly: every process resolves them itself through the AWS SDK's standard
chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
``~/.aws``, instance or pod roles). So a filesystem object shipped to a Ray worker pickles to its settings only
(``S3Store.__reduce__``), never to a key, and short-lived role credentials are refreshed where they are used.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import random
import re
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# AWS error codes (as pyarrow spells them) that say "try again"; everything else is permanent.
TRANSIENT = re.compile(
    r"SLOW_DOWN|SlowDown|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTLING|REQUEST_TIMEOUT|NETWORK_CONNECTION|"
    r"HTTP status 5\d\d|curlCode|Connection reset|timed out|Timeout",
)
PERMANENT_HINTS = {
    "ACCESS_DENIED": "access denied (HTTP 403): check the credentials and the bucket policy",
    "HTTP status 403": "access denied (HTTP 403): check the credentials and the bucket policy",
    "INVALID_ACCESS_KEY_ID": "the access key is not known to the store (HTTP 403)",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key (HTTP 403)",
    "NO_SUCH_BUCKET": "no such bucket",
    "does not exist": "no such bucket",
}


class StorageError(RuntimeError):
    """A storage operation failed for good (permission, missing bucket, retries exhausted). Text has no secrets."""


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """How to reach object storage. Everything else (keys, profile) comes from the standard AWS settings.

    endpoint: any S3-compatible store (``http://127.0.0.1:9000``); default ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` from the environment (pyarrow does not read these itself), else AWS.
    retries: attempts per request in the AWS SDK's standard retry mode (exponential backoff with jitter).
    """

    endpoint: str | None = None
    region: str | None = None
    retries: int = 10
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 60.0

    def __post_init__(self):
        if self.retries < 1:
            raise ValueError(f"storage_retries must be >= 1, got {self.retries}")
        if self.endpoint is not None and urlparse(self.endpoint).scheme not in ("http", "https"):
            raise ValueError(f"storage_endpoint must be an http:// or https:// URL, got {self.endpoint!r}")

    def resolved(self) -> StorageConfig:
        """Fill endpoint and region from the environment on the driver, so every worker uses the same ones."""
        env = os.environ
        return StorageConfig(
            endpoint=self.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            retries=self.retries,
            connect_timeout_s=self.connect_timeout_s,
            request_timeout_s=self.request_timeout_s,
        )


def _make_s3(cfg: StorageConfig) -> S3Store:
    return S3Store(cfg)


class S3Store(pafs.S3FileSystem):
    """pyarrow's S3FileSystem that pickles to its StorageConfig (pyarrow's own pickle drops the retry strategy)."""

    def __init__(self, cfg: StorageConfig):
        endpoint = urlparse(cfg.endpoint) if cfg.endpoint else None
        super().__init__(
            region=cfg.region,
            endpoint_override=endpoint.netloc + endpoint.path.rstrip("/") if endpoint else None,
            scheme=endpoint.scheme if endpoint else None,
            connect_timeout=cfg.connect_timeout_s,
            request_timeout=cfg.request_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries),
        )
        self.cfg = cfg

    def __reduce__(self):
        return _make_s3, (self.cfg,)


def is_local(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def resolve(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (filesystem, path inside it). Local paths become absolute (Ray workers have other cwds)."""
    cfg = (cfg or StorageConfig()).resolved()
    parsed = urlparse(uri)
    if is_local(uri):
        path = parsed.path if parsed.scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise ValueError(f"{uri!r} names no bucket; expected s3://bucket/prefix")
        return S3Store(cfg), (parsed.netloc + parsed.path).rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)  # gs://, hdfs://, abfs:// ... where pyarrow has them
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"cannot open {uri!r}: scheme {parsed.scheme!r} is not supported ({redact(str(e))})") from e
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts) if not is_local(uri) else os.path.join(uri, *parts)


def redact(text: str) -> str:
    """``text`` with the values of the credential variables of this process blanked out."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{name}>")
    return text


def is_transient(e: BaseException) -> bool:
    return isinstance(e, (TimeoutError, ConnectionError)) or (
        isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and bool(TRANSIENT.search(str(e)))
    )


def describe(e: BaseException, uri: str) -> str:
    """One line naming the location and the cause, without secrets or request ids."""
    text = redact(str(e))
    reason = next((hint for key, hint in PERMANENT_HINTS.items() if key in text), None)
    parsed = urlparse(uri)
    where = f"bucket {parsed.netloc!r}, prefix {parsed.path.lstrip('/')!r}" if parsed.netloc else repr(uri)
    detail = re.sub(r"\s*\(Request ID: [^)]*\)", "", text).strip()
    return f"{where}: {reason or 'storage error'} ({detail})"


def storage_error(e: BaseException, uri: str) -> StorageError:
    return StorageError(describe(e, uri))


def with_retries(fn, *, what: str, attempts: int = 4, base_s: float = 0.5, max_s: float = 20.0):
    """Call ``fn()``; retry transient storage errors with exponential backoff and full jitter, then give up.

    The AWS SDK already retries each request; this outer loop covers a whole-file operation that fails past
    it (a multipart upload whose completion fails, a connection reset mid-stream) and other filesystems.
    Written here because Ray's equivalent (``call_with_retry``) is private API.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            delay = random.uniform(0, min(max_s, base_s * 2**attempt))
            logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, redact(str(e)), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Whole or nothing: object stores publish a PUT whole; a local file is written aside and renamed."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{os.getpid()}-{posixpath.basename(path)}")
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(fs: pafs.FileSystem, path: str, obj) -> None:
    payload = json.dumps(obj, indent=1, sort_keys=False).encode()
    with_retries(lambda: write_atomic(fs, path, payload), what=f"writing {path}")


def read_json(fs: pafs.FileSystem, path: str):
    def read():
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())

    return with_retries(read, what=f"reading {path}")


def check_bucket(fs: pafs.FileSystem, uri: str) -> None:
    """For s3:// URIs, fail fast with a clear error when the bucket is missing (a listing would just be empty)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a") and fs.get_file_info(parsed.netloc).type == pafs.FileType.NotFound:
        raise StorageError(f"bucket {parsed.netloc!r}, prefix {parsed.path.lstrip('/')!r}: no such bucket")


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """All files under ``path`` (recursive), sorted; [] when it does not exist."""
    return sorted(file_sizes(fs, path))


def file_sizes(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    """{file: bytes} for every file under ``path`` (recursive), from one listing (no request per file)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return {}
    if info.type == pafs.FileType.File:
        return {path: info.size}
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path: i.size for i in found if i.type == pafs.FileType.File}


def cache_dir() -> str:
    """Node-local cache for models fetched from object storage and the bundled teacher: ``KALM_CACHE``, else
    ``~/.cache/kalm-pipeline``."""
    return os.environ.get("KALM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kalm-pipeline")


def fetch_folder(uri: str, storage: StorageConfig | None = None) -> str:
    """Copy every file under an object-storage prefix (a model folder) into the node-local cache, once per node.

    Keyed by the URI and the listing (names and sizes), so a changed model is fetched again. Concurrent actors on a
    node wait on a file lock and the folder appears by an atomic rename, so a model is downloaded once per node,
    not once per actor. Returns the local folder.
    """
    import fcntl
    import hashlib
    import tempfile

    fs, root = resolve(uri, storage)
    try:
        check_bucket(fs, uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise storage_error(e, uri) from e
    files = sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"model folder {uri!r} is empty or does not exist")
    key = hashlib.sha256(json.dumps([uri, files]).encode()).hexdigest()[:20]
    target = os.path.join(cache_dir(), "models", "remote", key)
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(target):
            return target
        logger.info("fetching model %s into %s", uri, target)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
            for path, _size in files:
                local = os.path.join(tmp, posixpath.relpath(path, root))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                with_retries(lambda p=path, dst=local: _download(fs, p, dst), what=f"fetching {path}")
            os.rename(tmp, target)
            os.makedirs(tmp)  # TemporaryDirectory cleans up a path it expects to exist
    return target


def _download(fs: pafs.FileSystem, path: str, local: str) -> None:
    with fs.open_input_stream(path) as src, open(local, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
