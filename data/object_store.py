"""Object storage behind one small interface: a local directory (the embedded default) or S3.

URIs: `s3://bucket/prefix` goes through boto3 (any S3-compatible endpoint via S3_ENDPOINT_URL or
AWS_ENDPOINT_URL; credentials from the environment or the user's AWS configuration, never from our
configs); anything else is a local path. `parse_uri` is the project's one URI parser: no other module
takes a URI apart. Keys are '/'-separated paths relative to the store root.
Writes are atomic for readers: a local file appears by rename, an S3 object appears whole.

Prefixes are folders in both backends: `list("a")`, `list_sizes("a")` and `delete_prefix("a")` mean
the folder a/ or the single object a, never a sibling such as a2/ or a.json; "" means the whole store.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from deco.data.errors import ExpectedError


class StorageError(ExpectedError, RuntimeError):
    """Storage is unreachable or misconfigured: the message says what to fix."""


log = logging.getLogger(__name__)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@dataclass(frozen=True)
class Location:
    """A parsed URI. scheme "s3": `bucket` and `key` (no leading or trailing '/'; "" for the bucket
    itself). scheme "file": `key` is the absolute local path and `bucket` is ""."""
    scheme: str
    bucket: str
    key: str

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def uri(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
        return self.key


def parse_uri(uri: str | Path) -> Location:
    """The one URI parser: `s3://bucket/key` or a local path (made absolute)."""
    text = str(uri)
    if is_s3(text):
        bucket, _, key = text[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"{text!r} names no bucket: use s3://bucket/prefix")
        return Location("s3", bucket, key.strip("/"))
    return Location("file", "", str(Path(text).expanduser().resolve()))


def bucket_uri(uri: str) -> str:
    """`s3://bucket` of an S3 URI (what to check for reachability); a local path has no bucket."""
    location = parse_uri(uri)
    if not location.is_s3:
        raise ValueError(f"{uri} is a local path, not an s3:// URI")
    return f"s3://{location.bucket}"


def store_and_key(file_uri: str | Path) -> tuple["LocalStore | S3Store", str]:
    """(store, key) of one file's URI: an S3 store rooted at the bucket, or a local store rooted at
    the file's folder."""
    location = parse_uri(file_uri)
    if location.is_s3:
        if not location.key:
            raise StorageError(f"{file_uri!r} names a bucket, not an object")
        return S3Store(f"s3://{location.bucket}"), location.key
    path = Path(location.key)
    return LocalStore(path.parent), path.name


def join(uri: str, *parts: str) -> str:
    base = str(uri).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts if p)])


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def check(self, create: bool = True) -> None:
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StorageError(f"{self.root} does not exist")
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")

    def _complete_temporary(self, key: str, data: bytes) -> tuple[Path, str]:
        """(the key's path, a hidden file beside it holding `data`, flushed to disk)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        return path, tmp.name

    def put_bytes(self, key: str, data: bytes) -> None:
        path, tmp = self._complete_temporary(key, data)
        os.replace(tmp, path)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; True when this call created it. Atomic: a complete
        hidden temporary file is hard-linked to the key (EEXIST: another writer won), so no reader and
        no racing writer ever sees a partial file."""
        path, tmp = self._complete_temporary(key, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise StorageError(f"{self.root} does not support hard links, which exclusive creates "
                                   f"need: use another filesystem for this store") from None
            raise
        finally:
            os.unlink(tmp)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{join(self.uri, key)} not found") from None

    def put_file(self, key: str, local: str | Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() == path.resolve():
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")  # concurrent writers never share it
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)

    def get_file(self, key: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        if self._path(key).resolve() != local.resolve():
            # Copied beside the target and renamed: a process that has the old file mapped (weights
            # opened with mmap) keeps its inode instead of seeing it rewritten under it (SIGBUS).
            tmp = local.with_name(f".{local.name}.{os.getpid()}.partial")
            shutil.copyfile(self._path(key), tmp)
            os.replace(tmp, local)
        return local

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{join(self.uri, key)} not found") from None

    def open(self, key: str) -> BinaryIO:
        """A seekable binary reader of one object."""
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{join(self.uri, key)} not found") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys of files under `prefix`, sorted; temporary files of unfinished writes are skipped."""
        base = self._path(prefix)
        if not base.exists():
            return iter(())
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        keys = sorted(str(p.relative_to(self.root)).replace(os.sep, "/") for p in files)
        return iter(k for k in keys if not Path(k).name.startswith("."))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size in bytes} of the files `list(prefix)` returns, in one pass."""
        return {key: (self.root / key).stat().st_size for key in self.list(prefix)}

    def delete_prefix(self, prefix: str) -> None:
        """Delete the folder `prefix` or the single file of that name; "" deletes the whole store."""
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class S3Store:
    def __init__(self, uri: str):
        location = parse_uri(uri)
        if not location.is_s3:
            raise StorageError(f"{uri!r} is not an s3:// URI")
        self.bucket, self.prefix, self.uri = location.bucket, location.key, location.uri
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
            # Adaptive retries back off on throttling (SlowDown) and connection resets.
            config = Config(retries={"max_attempts": 10, "mode": "adaptive"}, connect_timeout=10, read_timeout=60)
            self._client = boto3.client("s3", endpoint_url=endpoint, config=config)
        return self._client

    def _key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    def check(self, create: bool = False) -> None:
        """Fail before any work starts when the bucket is missing or credentials are wrong."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageError("no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or configure a profile") from None
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"bucket {self.bucket!r} does not exist (from {self.uri}); create it or fix the URI") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"access to bucket {self.bucket!r} denied ({code}): check the credentials") from None
            raise StorageError(f"cannot reach bucket {self.bucket!r}: {err}") from None
        except BotoCoreError as err:
            raise StorageError(f"cannot reach S3 for {self.uri}: {err}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; True when this call created it: a conditional PUT
        (If-None-Match: *), which S3 answers 412 when the object exists. A 409 (a racing conditional
        write still in flight) is retried, so the answer is that writer's outcome."""
        from botocore.exceptions import ClientError

        for attempt in range(6):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code == "PreconditionFailed" or status == 412:
                    return False
                if code in ("NotImplemented",) or status == 501:
                    break
                if not (code == "ConditionalRequestConflict" or status == 409) or attempt == 5:
                    raise
                time.sleep(0.05 * 2 ** attempt)
        # An S3-compatible store without conditional writes: check, then write (not atomic).
        log.warning("%s does not support conditional writes; falling back to check-then-write", self.uri)
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return True

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{join(self.uri, key)} not found") from None
            raise

    def put_file(self, key: str, local: str | Path) -> None:
        from boto3.s3.transfer import TransferConfig

        # Multipart above 64 MiB; boto3 retries each part.
        self.client.upload_file(str(local), self.bucket, self._key(key),
                                Config=TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20))

    def get_file(self, key: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        # Unique per process: ranks on one host may fetch the same file into a shared directory.
        tmp = local.with_name(f".{local.name}.{os.getpid()}.partial")
        self.client.download_file(self.bucket, self._key(key), str(tmp))
        os.replace(tmp, local)
        return local

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{join(self.uri, key)} not found") from None
            raise

    def open(self, key: str, buffer_size: int = 8 * 2**20) -> BinaryIO:
        """A seekable binary reader of one object: ranged GETs of `buffer_size` bytes, so readers
        such as pyarrow fetch only what they read (a parquet footer, some row groups)."""
        raw = _S3RangeReader(self.client, self.bucket, self._key(key), self.size(key))
        return io.BufferedReader(raw, buffer_size=buffer_size)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under the folder `prefix`, or `prefix` itself when it is an object; sorted."""
        return iter(sorted(self.list_sizes(prefix)))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size in bytes} of the folder `prefix` (every key under `prefix/`) and of the object
        named `prefix` itself, never of a sibling such as `prefix2/`; "" is the whole store. From the
        listing itself (no request per object). Folder markers (keys ending in '/') are not files."""
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        sizes = {}
        if prefix.strip("/"):
            # The object named exactly `full` sorts first among the keys that start with it.
            first = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1).get("Contents", [])
            if first and first[0]["Key"] == full:
                sizes[full[strip:]] = first[0]["Size"]
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{full}/" if full else ""):
            sizes.update({obj["Key"][strip:]: obj["Size"] for obj in page.get("Contents", [])
                          if not obj["Key"].endswith("/")})
        return sizes

    def delete_prefix(self, prefix: str) -> None:
        """Delete what `list(prefix)` names ("" deletes the whole store). S3 answers a batch delete
        with per-key errors rather than failing it: every batch's are checked, and any raise."""
        keys = [self._key(k) for k in self.list(prefix)]
        errors = []
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors.extend(response.get("Errors", []))
        if errors:
            shown = ", ".join(f"{e.get('Key')} ({e.get('Code')}: {e.get('Message')})" for e in errors[:5])
            more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
            raise StorageError(f"could not delete {len(errors)} of {len(keys)} objects under "
                               f"{join(self.uri, prefix)}: {shown}{more}")


class _S3RangeReader(io.RawIOBase):
    def __init__(self, client, bucket: str, key: str, size: int):
        self.client, self.bucket, self.key, self.length, self.position = client, bucket, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        if self.position >= self.length or len(buffer) == 0:
            return 0
        end = min(self.position + len(buffer), self.length) - 1
        body = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.position}-{end}")["Body"]
        data = body.read()
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def open_store(uri: str | Path) -> LocalStore | S3Store:
    return S3Store(str(uri)) if is_s3(str(uri)) else LocalStore(uri)
