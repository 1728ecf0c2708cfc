"""Where inputs and outputs live: the local folders (default, today's layout) or an S3-compatible bucket.

Files belong to an *area* ("inputs" or "outputs") and have a server-generated *name*. The database keeps a
*reference* per file: for the local backend the absolute path (exactly what was stored before this module
existed), for S3 ``s3://<bucket>/<prefix><area>/<name>``. Every method takes references, so code that reads,
deletes or lists files does not care which backend is configured.

Uploads are atomic on both backends: the local one writes a temp file, fsyncs and renames; the S3 one uploads
to a temp key and copies it to the final key (an object appears under its final key whole or not at all, also
for multipart uploads), then deletes the temp key. Credentials come from the environment only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from generator.scheduler.disk import storage_problem

if TYPE_CHECKING:
    from turbobot.config import Settings

AREAS = ("inputs", "outputs")
TEMP_PREFIX = ".partial-upload-"
S3_SCHEME = "s3://"


class StoreError(OSError):
    """The store cannot be reached or refused an operation (the message is for the operator)."""


@dataclass(frozen=True)
class Entry:
    name: str
    ref: str
    modified: float  # seconds since the epoch (the store's clock for S3)


class FileStore:
    """Common interface; see ``LocalStore`` and ``S3Store``."""

    kind = "base"

    def ref(self, area: str, name: str) -> str:
        raise NotImplementedError

    def name_of(self, ref: str) -> str:
        """The file name a reference ends in."""
        return ref.rstrip("/").rsplit("/", 1)[-1]

    def owns(self, ref: str) -> bool:
        """Whether ``ref`` names a file of this store (a local path for local, an s3:// URL for S3)."""
        raise NotImplementedError

    def put_bytes(self, area: str, name: str, data: bytes) -> str:
        raise NotImplementedError

    def put_file(self, area: str, name: str, src: Path) -> str:
        """Store the local file ``src`` under ``area/name`` (``src`` is left in place)."""
        raise NotImplementedError

    def get_bytes(self, ref: str) -> bytes:
        raise NotImplementedError

    def fetch(self, ref: str, dst: Path) -> Path | None:
        """A local file holding the object: the file itself for the local backend, else a download to
        ``dst``. None when the object does not exist."""
        raise NotImplementedError

    def exists(self, ref: str) -> bool:
        raise NotImplementedError

    def delete(self, ref: str) -> bool:
        """True when something was deleted; a missing object is not an error."""
        raise NotImplementedError

    def entries(self, area: str) -> list[Entry]:
        """Every object in ``area`` with its modification time (temp objects included, for the sweeps)."""
        raise NotImplementedError

    def list(self, area: str) -> list[tuple[str, str]]:
        """(name, reference) of every object in ``area`` (temp objects included, for the sweep)."""
        return [(e.name, e.ref) for e in self.entries(area)]

    def problem(self) -> str:
        """"" when new files can be stored now, else why not (for the operator)."""
        raise NotImplementedError

    def invalidate(self) -> None:
        """Forget a cached ``problem()`` answer (an operation just failed)."""


class LocalStore(FileStore):
    """The configured ``app.inputs_dir`` / ``app.outputs_dir`` folders (references are absolute paths)."""

    kind = "local"

    def __init__(self, inputs_dir: Path, outputs_dir: Path, min_free_bytes: int = 0) -> None:
        self.dirs = {"inputs": Path(inputs_dir), "outputs": Path(outputs_dir)}
        self.min_free_bytes = min_free_bytes

    def _dir(self, area: str) -> Path:
        if area not in self.dirs:
            raise ValueError(f"unknown area {area!r}")
        return self.dirs[area]

    def ref(self, area: str, name: str) -> str:
        return str(self._dir(area) / name)

    def owns(self, ref: str) -> bool:
        return not ref.startswith(S3_SCHEME)

    def put_bytes(self, area: str, name: str, data: bytes) -> str:
        directory = self._dir(area)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / name
        tmp = directory / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(directory)
        return str(final)

    def put_file(self, area: str, name: str, src: Path) -> str:
        directory = self._dir(area)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, directory / name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(directory)
        return str(directory / name)

    def get_bytes(self, ref: str) -> bytes:
        return Path(ref).read_bytes()

    def fetch(self, ref: str, dst: Path) -> Path | None:
        p = Path(ref)
        return p if p.is_file() else None

    def exists(self, ref: str) -> bool:
        return Path(ref).is_file()

    def delete(self, ref: str) -> bool:
        try:
            Path(ref).unlink()
        except FileNotFoundError:
            return False
        return True

    def entries(self, area: str) -> list[Entry]:
        directory = self._dir(area)
        out: list[Entry] = []
        try:
            with os.scandir(directory) as it:
                for d in it:
                    with contextlib.suppress(FileNotFoundError):  # removed while listing
                        out.append(Entry(d.name, str(directory / d.name), d.stat(follow_symlinks=False).st_mtime))
        except (FileNotFoundError, NotADirectoryError):  # missing, or a file in its place (reported elsewhere)
            return []
        return out

    def problem(self) -> str:
        return storage_problem((self.dirs["outputs"], self.dirs["inputs"]), self.min_free_bytes)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store(FileStore):
    """An S3-compatible bucket (AWS S3, MinIO, R2, Ceph, ...) through boto3."""

    kind = "s3"

    def __init__(
        self, *, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "",
        access_key: str | None = None, secret_key: str | None = None, timeout_s: float = 10.0,
        problem_ttl_s: float = 2.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self._creds = (access_key, secret_key)
        self.timeout_s = timeout_s
        self.problem_ttl_s = problem_ttl_s
        self._client: Any = None
        self._lock = threading.Lock()
        self._problem: tuple[float, str] | None = None

    # --- plumbing --------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError as exc:  # pragma: no cover - depends on the install
                    raise StoreError("store.backend = \"s3\" needs boto3: pip install 'turbobot[s3]'") from exc
                # Short timeouts and few retries: an outage must show up as "not ready" quickly, not hang
                # a worker; the next poll tries again.
                cfg = Config(
                    connect_timeout=self.timeout_s, read_timeout=max(self.timeout_s, 30.0),
                    retries={"max_attempts": 2, "mode": "standard"},
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                )
                self._client = boto3.client(
                    "s3", endpoint_url=self.endpoint_url or None, region_name=self.region or None,
                    aws_access_key_id=self._creds[0], aws_secret_access_key=self._creds[1], config=cfg,
                )
            return self._client

    def _key(self, area: str, name: str) -> str:
        if area not in AREAS:
            raise ValueError(f"unknown area {area!r}")
        return f"{self.prefix}{area}/{name}"

    def _key_of(self, ref: str) -> str:
        head = f"{S3_SCHEME}{self.bucket}/"
        if not ref.startswith(head):
            raise ValueError(f"{ref!r} is not an object of bucket {self.bucket!r}")
        return ref[len(head):]

    def _ref_of(self, key: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{key}"

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError:
            raise
        except BotoCoreError as exc:
            raise StoreError(f"object store {what} failed: {exc}") from exc

    @staticmethod
    def _missing(exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    # --- interface -------------------------------------------------------------------------------
    def ref(self, area: str, name: str) -> str:
        return self._ref_of(self._key(area, name))

    def owns(self, ref: str) -> bool:
        return ref.startswith(f"{S3_SCHEME}{self.bucket}/")

    def _publish(self, area: str, name: str, upload: Any) -> str:
        final = self._key(area, name)
        tmp = self._key(area, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
        try:
            upload(tmp)
            self._call(
                "copy", self.client.copy_object, Bucket=self.bucket, Key=final,
                CopySource={"Bucket": self.bucket, "Key": tmp},
            )
        finally:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=tmp)
        return self._ref_of(final)

    def put_bytes(self, area: str, name: str, data: bytes) -> str:
        return self._publish(
            area, name, lambda key: self._call("upload", self.client.put_object, Bucket=self.bucket, Key=key, Body=data)
        )

    def put_file(self, area: str, name: str, src: Path) -> str:
        return self._publish(
            area, name,
            lambda key: self._call("upload", self.client.upload_file, Filename=str(src), Bucket=self.bucket, Key=key),
        )

    def get_bytes(self, ref: str) -> bytes:
        obj = self._call("download", self.client.get_object, Bucket=self.bucket, Key=self._key_of(ref))
        return bytes(obj["Body"].read())

    def fetch(self, ref: str, dst: Path) -> Path | None:
        from botocore.exceptions import ClientError

        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
        try:
            self._call("download", self.client.download_file, Bucket=self.bucket, Key=self._key_of(ref), Filename=str(tmp))
            os.replace(tmp, dst)  # a reader of dst never sees half a download
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise StoreError(f"object store download failed: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return dst

    def exists(self, ref: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._key_of(ref))
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise StoreError(f"object store head failed: {exc}") from exc
        return True

    def delete(self, ref: str) -> bool:
        if not self.exists(ref):
            return False
        self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._key_of(ref))
        return True

    def entries(self, area: str) -> list[Entry]:
        prefix = self._key(area, "")
        out: list[Entry] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = str(obj["Key"])
                    name = key[len(prefix):]
                    if name and "/" not in name:
                        out.append(Entry(name, self._ref_of(key), obj["LastModified"].timestamp()))
        except Exception as exc:
            raise StoreError(f"object store list failed: {exc}") from exc
        return out

    def invalidate(self) -> None:
        self._problem = None

    def problem(self) -> str:
        """Can the bucket be reached now? Cached briefly: workers ask before every claim."""
        now = time.monotonic()
        cached = self._problem
        if cached is not None and now - cached[0] < self.problem_ttl_s:
            return cached[1]
        try:
            self.client.head_bucket(Bucket=self.bucket)
            problem = ""
        except Exception as exc:
            problem = f"object store bucket {self.bucket!r} at {self.endpoint_url or 'AWS'} is not usable: {exc}"[:300]
        self._problem = (time.monotonic(), problem)
        return problem


def make_store(settings: Settings) -> FileStore:
    """The store ``[store]`` configures (``local`` keeps today's folders)."""
    from turbobot.config import read_secret

    cfg = settings.store
    if cfg.backend == "s3":
        return S3Store(
            bucket=cfg.bucket, prefix=cfg.prefix, endpoint_url=cfg.endpoint_url, region=cfg.region,
            access_key=read_secret(cfg.access_key_env), secret_key=read_secret(cfg.secret_key_env),
            timeout_s=cfg.timeout_seconds,
        )
    return LocalStore(
        settings.path(settings.app.inputs_dir).resolve(), settings.path(settings.app.outputs_dir).resolve(),
        settings.app.min_free_bytes,
    )


_STORES: dict[int, tuple[Settings, FileStore]] = {}


def store_for(settings: Settings) -> FileStore:
    """One store per settings object (front ends share its client and its cache folder)."""
    held = _STORES.get(id(settings))
    if held is None or held[0] is not settings:
        held = (settings, make_store(settings))
        _STORES[id(settings)] = held
    return held[1]


def is_remote(ref: str) -> bool:
    return ref.startswith(S3_SCHEME)


def local_copy(settings: Settings, ref: str) -> Path | None:
    """A local file with the content of a stored object, for delivery and the console (blocking: call it
    in a thread). Objects never change under a name, so a copy in ``store.cache_dir`` is reused; the cache
    can be deleted at any time. None when the object does not exist."""
    store = store_for(settings)
    if not store.owns(ref):
        return None
    cache = settings.path(settings.store.cache_dir).resolve()
    dst = cache / store.name_of(ref)
    if dst.is_file():
        with contextlib.suppress(OSError):
            os.utime(dst)  # recently used: the cache pruning (upkeep.prune_cache) removes the oldest first
        return dst
    return store.fetch(ref, dst)
