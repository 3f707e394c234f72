"""Fetching images of URL-list sources over HTTP: retries with backoff, timeouts, per-host limits.

A fetch that still fails after its retries is a data error (the sample is rejected as
`fetch_failed` with the status or error in the detail), never a job failure. Transient failures
(connection errors, timeouts, 408/425/429/5xx) are retried with exponential backoff and jitter,
honouring Retry-After; other 4xx answers are final at once.

The per-host limit holds within one fetcher (one worker process): with N Ray workers a host sees
at most N x per_host_concurrency requests at a time.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Iterator, Sequence
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(kw_only=True)
class HttpConfig:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0  # between bytes, not for the whole body
    retries: int = 3              # attempts after the first
    backoff_s: float = 0.5        # first retry delay; doubles each retry, +-25% jitter
    max_backoff_s: float = 30.0
    per_host_concurrency: int = 8
    threads: int = 32             # concurrent fetches per worker
    max_bytes: int = 50 * 2**20
    user_agent: str = "deco-pipeline-curation/0.1"

    def validate(self) -> None:
        if self.per_host_concurrency < 1 or self.threads < 1 or self.retries < 0:
            raise ValueError("http.per_host_concurrency and http.threads must be >= 1, http.retries >= 0")


@dataclass(frozen=True)
class FetchResult:
    url: str
    data: bytes | None
    error: str = ""      # why data is None: "HTTP 404", "ReadTimeout: ...", "too large: ..."
    status: int | None = None
    attempts: int = 0


class _Retryable(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class _Final(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class HttpFetcher:
    def __init__(self, cfg: HttpConfig):
        self.cfg = cfg
        self._local = threading.local()
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _session(self):
        import requests
        from requests.adapters import HTTPAdapter

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=self.cfg.per_host_concurrency, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = self.cfg.user_agent
            self._local.session = session
        return session

    @contextmanager
    def _host_slot(self, host: str) -> Iterator[None]:
        with self._lock:
            slot = self._host_slots.setdefault(host, threading.BoundedSemaphore(self.cfg.per_host_concurrency))
        with slot:
            yield

    def _attempt(self, url: str, host: str) -> tuple[bytes, int]:
        import requests

        timeout = (self.cfg.connect_timeout_s, self.cfg.read_timeout_s)
        with self._host_slot(host):
            try:
                with self._session().get(url, timeout=timeout, stream=True, allow_redirects=True) as response:
                    status = response.status_code
                    if status in RETRY_STATUS:
                        raise _Retryable(f"HTTP {status}", status, _retry_after_seconds(response.headers.get("Retry-After")))
                    if status >= 400:
                        raise _Final(f"HTTP {status}", status)
                    declared = response.headers.get("Content-Length")
                    if declared and declared.isdigit() and int(declared) > self.cfg.max_bytes:
                        raise _Final(f"too large: {declared} bytes > {self.cfg.max_bytes}", status)
                    chunks, total = [], 0
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        total += len(chunk)
                        if total > self.cfg.max_bytes:
                            raise _Final(f"too large: over {self.cfg.max_bytes} bytes", status)
                        chunks.append(chunk)
                    return b"".join(chunks), status
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                raise _Retryable(f"{type(err).__name__}: {str(err)[:160]}") from None
            except requests.RequestException as err:  # invalid URL, too many redirects, ...
                raise _Final(f"{type(err).__name__}: {str(err)[:160]}") from None

    def fetch(self, url: str) -> FetchResult:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return FetchResult(url, None, f"unsupported URL {url[:120]!r}")
        delay, attempt = self.cfg.backoff_s, 0
        while True:
            attempt += 1
            try:
                data, status = self._attempt(url, parts.netloc)
                return FetchResult(url, data, status=status, attempts=attempt)
            except _Final as err:
                return FetchResult(url, None, str(err), err.status, attempt)
            except _Retryable as err:
                if attempt > self.cfg.retries:
                    return FetchResult(url, None, f"{err} after {attempt} attempts", err.status, attempt)
                wait = err.retry_after if err.retry_after is not None else delay * random.uniform(0.75, 1.25)
                log.debug("retrying %s in %.2fs after %s", url, wait, err)
                time.sleep(min(wait, self.cfg.max_backoff_s))
                delay = min(delay * 2, self.cfg.max_backoff_s)

    def fetch_all(self, urls: Sequence[str]) -> list[FetchResult]:
        """Fetch concurrently; results in the order of `urls`."""
        if not urls:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.threads, len(urls)), thread_name_prefix="fetch") as pool:
            return list(pool.map(self.fetch, urls))
