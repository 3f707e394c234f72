"""File checksums for things that must not change silently (checkpoints): computed while a file
is written, verified in chunks when it is read, so a 20 GB file never sits in memory.

xxh3_128: fast enough to hash at disk speed, and any flipped bit or truncation changes it. It is
not a defence against someone who rewrites a file on purpose (use object-store permissions).
"""
from __future__ import annotations

import errno
import os

import xxhash

CHECKSUM = "xxh3_128"
_CHUNK = 8 << 20


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC / EDQUOT): the path and the bytes written so far."""


def file_checksum(path: str | os.PathLike) -> str:
    """`xxh3_128:<hex>` of a file, read in chunks (a 20 GB shard never sits in memory)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return f"{CHECKSUM}:{digest.hexdigest()}"


class HashingWriter:
    """A write-only file object that checksums what passes through it, so a file is hashed while
    it is written rather than read back. A full disk surfaces as DiskFullError naming the path."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._file = open(self.path, "wb")
        self._digest = xxhash.xxh3_128()
        self.size = 0
        self.error: OSError | None = None  # what a caller that wraps our errors (torch.save) lost

    def write(self, data) -> int:
        try:
            written = self._file.write(data)
        except OSError as err:
            self.error = _disk_full(err, self.path, self.size)
            raise self.error from None
        self._digest.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> str:
        """Flush to disk and return the checksum."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            self.error = _disk_full(err, self.path, self.size)
            raise self.error from None
        finally:
            self._file.close()
        return f"{CHECKSUM}:{self._digest.hexdigest()}"

    def abandon(self) -> None:
        self._file.close()


def _disk_full(err: OSError, path: str, written: int) -> OSError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(err.errno, f"no space left on the device writing {path} ({written} bytes written)")
    return err
