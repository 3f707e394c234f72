"""Fetching images of URL-list sources over HTTP: retries with backoff, timeouts, per-host limits,
an overall deadline, a size cap, and no fetches from loopback, link-local or private addresses.

A fetch that still fails after its retries is a data error (the sample is rejected as
`fetch_failed` with the status or error in the detail), never a job failure. Transient failures
(connection errors, timeouts, 408/425/429/5xx) are retried with exponential backoff and jitter,
honouring Retry-After; other 4xx answers are final at once.

Deadline: `deadline_s` bounds the whole fetch - every attempt, redirect hop, header and body read
and retry wait. read_timeout_s alone cannot: it bounds the gap between two bytes, so a server that
sends one byte a second holds a fetch for as long as it likes. When the deadline passes, a timer
shuts down the fetch's socket, which ends a blocked read at once; a retry wait that would end past
the deadline ends the fetch instead. Name resolution (getaddrinfo) is the one wait it cannot cut.

Addresses: URL lists often come from outside, so a fetch may only reach public addresses unless
`allow_networks` lists the network (an SSRF guard: no cloud metadata at 169.254.169.254, no
services on 127.0.0.1 or 10.x). The check is made where the connection is opened: the host is
resolved once, every address it resolves to is checked, and the socket is connected to an address
that passed - never to a second resolution, so DNS rebinding between the check and the connect is
not possible. The Host header and TLS SNI still carry the name. Names, decimal or hex spellings
(http://2130706433/), IPv4-mapped, 6to4 and NAT64 IPv6 forms are all judged by the address they
reach. Redirects are followed here, one hop at a time (at most max_redirects), so every hop goes
through the same check. Through an HTTP(S)_PROXY from the environment the proxy resolves names:
then only literal addresses in URLs are checked.

The per-host limit holds within one fetcher (one worker process): with N Ray workers a host sees
at most N x per_host_concurrency requests at a time.
"""
from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Iterator, Sequence
from urllib.parse import urljoin, urlsplit

from deco.data.http_guard import AddressRefused, Deadline, active, address_refusal, checked_adapter, parse_networks

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
    max_bytes: int = 50 * 2**20   # per image, with or without a Content-Length
    deadline_s: float = 60.0      # the whole fetch: all attempts, redirects, reads and retry waits
    max_redirects: int = 5
    # Networks fetched although they are not public (loopback, link-local, private, ...), as CIDRs:
    # ["10.0.0.0/8"], ["127.0.0.1/32"]; ["0.0.0.0/0", "::/0"] turns the check off.
    allow_networks: list[str] = field(default_factory=list)
    user_agent: str = "deco-pipeline-curation/0.1"

    def validate(self) -> None:
        if self.per_host_concurrency < 1 or self.threads < 1 or self.retries < 0:
            raise ValueError("sources.http.per_host_concurrency and sources.http.threads must be >= 1, "
                             "sources.http.retries >= 0")
        if not self.deadline_s > 0 or self.max_redirects < 0 or self.max_bytes < 1:
            raise ValueError(f"sources.http.deadline_s must be > 0, sources.http.max_redirects >= 0 and "
                             f"sources.http.max_bytes >= 1, got {self.deadline_s}, {self.max_redirects} and "
                             f"{self.max_bytes}")
        parse_networks(self.allow_networks)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return parse_networks(self.allow_networks)


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


class _Expired(Exception):
    def __init__(self, status: int | None = None):
        super().__init__("deadline exceeded")
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
        self._allowed = cfg.networks()
        self._local = threading.local()
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = checked_adapter(self._allowed, pool_connections=8, pool_maxsize=self.cfg.per_host_concurrency,
                                       max_retries=0)
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

    def _check_literal(self, host: str) -> None:
        """Refuse a literal address before connecting (the connection checks again what it reaches;
        this also covers fetches through a proxy, which resolves names itself)."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return
        kind = address_refusal(ip, self._allowed)
        if kind is not None:
            raise AddressRefused(host, host, kind)

    def _attempt(self, url: str, deadline: Deadline) -> tuple[bytes, int]:
        """One attempt: follows redirects itself, so every hop's address is checked."""
        import requests

        session = self._session()
        for hop in range(self.cfg.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _Final(f"unsupported redirect target {url[:120]!r}")
            remaining = max(deadline.remaining(), 0.001)
            timeout = (min(self.cfg.connect_timeout_s, remaining), min(self.cfg.read_timeout_s, remaining))
            status = None
            with self._host_slot(parts.netloc):
                try:
                    self._check_literal(parts.hostname)
                    with session.get(url, timeout=timeout, stream=True, allow_redirects=False) as response:
                        status = response.status_code
                        target = session.get_redirect_target(response)
                        if target is not None:
                            url = requests.utils.requote_uri(urljoin(url, target))
                            continue
                        if status in RETRY_STATUS:
                            retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
                            raise _Retryable(f"HTTP {status}", status, retry_after)
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
                        if deadline.expired:  # a body without Content-Length ends where the timer cut it
                            raise _Expired(status)
                        return b"".join(chunks), status
                except AddressRefused as err:
                    redirected = f" (redirected to {url[:120]})" if hop else ""
                    raise _Final(f"refused: {err}{redirected}; allow it with sources.http.allow_networks") from None
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                    if deadline.expired:
                        raise _Expired(status) from None
                    raise _Retryable(f"{type(err).__name__}: {str(err)[:160]}") from None
                except requests.RequestException as err:  # invalid URL, ...
                    if deadline.expired:
                        raise _Expired(status) from None
                    raise _Final(f"{type(err).__name__}: {str(err)[:160]}") from None
        raise _Final(f"too many redirects (over {self.cfg.max_redirects})")

    def fetch(self, url: str) -> FetchResult:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return FetchResult(url, None, f"unsupported URL {url[:120]!r}")
        deadline = Deadline(self.cfg.deadline_s)
        active.deadline = deadline
        try:
            return self._fetch(url, deadline)
        finally:
            active.deadline = None
            deadline.cancel()

    def _fetch(self, url: str, deadline: Deadline) -> FetchResult:
        def expired(attempts: int, status: int | None, last: str = "") -> FetchResult:
            error = f"deadline {deadline.seconds:g} s exceeded after {attempts} attempt{'s' if attempts > 1 else ''}"
            return FetchResult(url, None, error + (f"; last: {last}" if last else ""), status, attempts)

        delay, attempt = self.cfg.backoff_s, 0
        while True:
            attempt += 1
            try:
                data, status = self._attempt(url, deadline)
                return FetchResult(url, data, status=status, attempts=attempt)
            except _Expired as err:
                return expired(attempt, err.status)
            except _Final as err:
                return FetchResult(url, None, str(err), err.status, attempt)
            except _Retryable as err:
                if attempt > self.cfg.retries:
                    return FetchResult(url, None, f"{err} after {attempt} attempts", err.status, attempt)
                wait = err.retry_after if err.retry_after is not None else delay * random.uniform(0.75, 1.25)
                wait = min(wait, self.cfg.max_backoff_s)
                if wait >= deadline.remaining():  # no time left for another attempt
                    return expired(attempt, err.status, str(err))
                log.debug("retrying %s in %.2fs after %s", url, wait, err)
                time.sleep(wait)
                delay = min(delay * 2, self.cfg.max_backoff_s)

    def fetch_all(self, urls: Sequence[str]) -> list[FetchResult]:
        """Fetch concurrently; results in the order of `urls`."""
        if not urls:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.threads, len(urls)), thread_name_prefix="fetch") as pool:
            return list(pool.map(self.fetch, urls))
