"""URL-list inputs against a real HTTP server on 127.0.0.1: retries, timeouts, per-host limits."""
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deco.data.http_fetch import HttpConfig, HttpFetcher
from deco.data.sources import SourceConfig, plan_partitions, read_partition


class Server:
    """Serves /img/<n> (after a short delay), /flaky/<n> (503 twice, then 200), /limited (429 once),
    /gone (404), /slow (longer than the test's read timeout) and /big (over max_bytes)."""

    def __init__(self):
        self.hits, self.active, self.peak = Counter(), Counter(), Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                host = self.headers["Host"].split(":")[0]
                with server.lock:
                    server.hits[self.path] += 1
                    hit = server.hits[self.path]
                    server.active[host] += 1
                    server.peak[host] = max(server.peak[host], server.active[host])
                try:
                    self.answer(hit)
                finally:
                    with server.lock:
                        server.active[host] -= 1

            def answer(self, hit):
                if self.path.startswith("/img/"):
                    time.sleep(0.05)
                    self.reply(200, f"image {self.path}".encode())
                elif self.path.startswith("/flaky/"):
                    self.reply(503 if hit <= 2 else 200, b"ok")
                elif self.path == "/limited":
                    self.reply(429 if hit == 1 else 200, b"ok", {"Retry-After": "0"})
                elif self.path == "/slow":
                    time.sleep(1.5)
                    self.reply(200, b"late")
                elif self.path == "/big":
                    self.reply(200, b"x" * 5000)
                else:
                    self.reply(404, b"no")

            def reply(self, status, body, headers=None):
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up first: that is what the slow routes test

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path, host="127.0.0.1"):
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def server():
    running = Server()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


FAST = dict(connect_timeout_s=1.0, read_timeout_s=0.4, retries=2, backoff_s=0.01, max_bytes=4096)


def test_retries_timeouts_and_final_errors(server):
    fetcher = HttpFetcher(HttpConfig(**FAST))
    flaky, limited = fetcher.fetch(server.url("/flaky/1")), fetcher.fetch(server.url("/limited"))
    assert (flaky.data, flaky.attempts, limited.data, limited.attempts) == (b"ok", 3, b"ok", 2)
    gone = fetcher.fetch(server.url("/gone"))
    assert gone.data is None and gone.error == "HTTP 404" and gone.attempts == 1
    slow = fetcher.fetch(server.url("/slow"))
    assert slow.data is None and "Timeout" in slow.error and slow.attempts == 3
    big = fetcher.fetch(server.url("/big"))
    assert big.data is None and "too large" in big.error and big.attempts == 1
    assert "unsupported" in fetcher.fetch("ftp://example.com/x.jpg").error
    assert server.hits["/flaky/1"] == 3 and server.hits["/gone"] == 1


def test_retries_give_up_with_the_last_error(server):
    result = HttpFetcher(HttpConfig(**{**FAST, "retries": 1})).fetch(server.url("/flaky/2"))
    assert result.data is None and result.error == "HTTP 503 after 2 attempts" and result.status == 503


def test_per_host_concurrency_limit(server):
    fetcher = HttpFetcher(HttpConfig(**{**FAST, "per_host_concurrency": 3, "threads": 16}))
    urls = [server.url(f"/img/{i}", host) for i in range(24) for host in ("127.0.0.1", "localhost")]
    results = fetcher.fetch_all(urls)
    assert [r.data for r in results] == [f"image /img/{i}".encode() for i in range(24) for _ in range(2)]
    assert server.peak["127.0.0.1"] == 3 and server.peak["localhost"] == 3  # reached, never passed, per host


def test_url_list_partitions_fetch_and_count_failures(server, tmp_path):
    urls = [server.url(f"/img/{i}") for i in range(5)] + [server.url("/gone"), server.url("/flaky/9"), "not a url"]
    table = pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]})
    pq.write_table(table, tmp_path / "list.parquet")
    cfg = SourceConfig(uris=[str(tmp_path)], partition_size=3, http=HttpConfig(**FAST))
    partitions = plan_partitions(cfg)
    assert [p.kind for p in partitions] == ["urls"] * 3
    samples = [s for p in partitions for s in read_partition(p, cfg)]
    assert [s.id for s in samples] == [f"list:{i}" for i in range(8)]
    assert [s.image for s in samples[:5]] == [f"image /img/{i}".encode() for i in range(5)]
    assert samples[6].image == b"ok" and samples[6].reject is None
    assert [(s.reject.reason, s.reject.detail) for s in (samples[5], samples[7])] == [
        ("fetch_failed", "HTTP 404"), ("fetch_failed", "unsupported URL 'not a url'")]
