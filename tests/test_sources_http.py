"""URL-list inputs against a real HTTP server on 127.0.0.1: retries, timeouts, per-host limits, the
overall deadline, the size cap and the refusal of loopback, link-local and private addresses (the
tests allow 127.0.0.1 explicitly)."""
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deco.data.http_fetch import HttpConfig, HttpFetcher, address_refusal
from deco.data.sources import SourceConfig, plan_partitions, read_partition


class Server:
    """Serves /img/<n> (after a short delay), /flaky/<n> (503 twice, then 200), /limited (429 once),
    /gone (404), /slow (longer than the test's read timeout), /big (over max_bytes), /big-stream (the
    same without Content-Length), /drip (a long body, one byte every 0.5 s), /drip-headers (headers
    one byte every 0.5 s), /down (always 503) and /redirect/<n>?to=<url> (302 to <url>, or to
    /redirect/<n+1> without `to`)."""

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
                elif self.path == "/big-stream":
                    self.send_response(200)
                    self.end_headers()  # no Content-Length: the body ends when the connection closes
                    self.write(b"x" * 5000)
                elif self.path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "40")
                    self.end_headers()
                    self.drip(b"x" * 40)
                elif self.path == "/drip-headers":
                    self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                    self.drip(b"X-Slow: " + b"y" * 40 + b"\r\n\r\nok")
                elif self.path == "/down":
                    self.reply(503, b"down")
                elif self.path.startswith("/redirect/"):
                    number, _, target = self.path[len("/redirect/"):].partition("?to=")
                    self.reply(302, b"", {"Location": unquote(target) or f"/redirect/{int(number) + 1}"})
                else:
                    self.reply(404, b"no")

            def reply(self, status, body, headers=None):
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.write(body)

            def write(self, body):
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up first: that is what the slow routes test

            def drip(self, body):
                try:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.5)
                except (BrokenPipeError, ConnectionResetError):
                    pass

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


FAST = dict(connect_timeout_s=1.0, read_timeout_s=0.4, retries=2, backoff_s=0.01, max_bytes=4096,
            allow_networks=["127.0.0.1/32"])


def test_retries_timeouts_and_final_errors(server):
    fetcher = HttpFetcher(HttpConfig(**FAST))
    flaky, limited = fetcher.fetch(server.url("/flaky/1")), fetcher.fetch(server.url("/limited"))
    assert (flaky.data, flaky.attempts, limited.data, limited.attempts) == (b"ok", 3, b"ok", 2)
    gone = fetcher.fetch(server.url("/gone"))
    assert gone.data is None and gone.error == "HTTP 404" and gone.attempts == 1
    slow = fetcher.fetch(server.url("/slow"))
    assert slow.data is None and "Timeout" in slow.error and slow.attempts == 3
    big = fetcher.fetch(server.url("/big"))
    assert big.data is None and big.error == "too large: 5000 bytes > 4096" and big.attempts == 1
    big = fetcher.fetch(server.url("/big-stream"))  # no Content-Length: counted while reading
    assert big.data is None and big.error == "too large: over 4096 bytes" and big.attempts == 1
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
    cfg = SourceConfig(uris=[str(tmp_path)], format="urls", partition_size=3, http=HttpConfig(**FAST))
    partitions = plan_partitions(cfg)
    assert [p.kind for p in partitions] == ["urls"] * 3
    samples = [s for p in partitions for s in read_partition(p, cfg)]
    assert [s.id for s in samples] == [f"list:{i}" for i in range(8)]
    assert [s.image for s in samples[:5]] == [f"image /img/{i}".encode() for i in range(5)]
    assert samples[6].image == b"ok" and samples[6].reject is None
    assert [(s.reject.reason, s.reject.detail) for s in (samples[5], samples[7])] == [
        ("fetch_failed", "HTTP 404"), ("fetch_failed", "unsupported URL 'not a url'")]


def timed_fetch(url, **cfg):
    start = time.monotonic()
    result = HttpFetcher(HttpConfig(**{**FAST, **cfg})).fetch(url)
    return result, time.monotonic() - start


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_deadline_ends_a_slow_drip(server, path):
    # Each byte comes within the read timeout, so only the overall deadline can end the fetch (the
    # body alone would take 20 s). The bound is generous: it checks the deadline is honoured.
    result, elapsed = timed_fetch(server.url(path), read_timeout_s=2.0, deadline_s=2.0)
    assert result.data is None and result.error == "deadline 2 s exceeded after 1 attempt" and result.attempts == 1
    assert elapsed < 6


def test_deadline_covers_retries_and_their_waits(server):
    result, elapsed = timed_fetch(server.url("/down"), retries=100, backoff_s=0.3, max_backoff_s=0.3, deadline_s=2.0)
    assert result.data is None and result.status == 503 and 2 <= result.attempts < 20
    assert result.error == f"deadline 2 s exceeded after {result.attempts} attempts; last: HTTP 503"
    assert elapsed < 6


REFUSAL = "; allow it with sources.http.allow_networks"


def test_loopback_is_refused_unless_allowed(server):
    refused = HttpFetcher(HttpConfig(**{**FAST, "allow_networks": []})).fetch(server.url("/img/1"))
    assert refused.data is None and refused.error == "refused: 127.0.0.1 is a loopback address" + REFUSAL
    assert refused.attempts == 1 and server.hits["/img/1"] == 0
    allowed = HttpFetcher(HttpConfig(**FAST)).fetch(server.url("/img/1"))
    assert allowed.data == b"image /img/1" and server.hits["/img/1"] == 1


def test_names_and_other_spellings_are_checked_where_they_resolve(server):
    """The check is made on the address the connection uses, so a name or an odd spelling of an
    address cannot slip through, and the connection goes to the address that was checked."""
    default = HttpFetcher(HttpConfig(**{**FAST, "allow_networks": []}))
    for host in ("localhost", "2130706433", "0x7f.1", "[::ffff:127.0.0.1]", "[::1]"):
        result = default.fetch(server.url("/img/2", host))
        assert result.data is None and result.error.startswith("refused: ") and result.error.endswith(REFUSAL), host
        assert "loopback address" in result.error, host
    assert default.fetch(server.url("/img/2", "localhost")).error in (
        "refused: localhost resolves to 127.0.0.1, a loopback address" + REFUSAL,
        "refused: localhost resolves to ::1, a loopback address" + REFUSAL)
    assert server.hits["/img/2"] == 0
    allowed = HttpFetcher(HttpConfig(**FAST))
    for host in ("localhost", "2130706433"):  # localhost may resolve to ::1 first: only 127.0.0.1 is used
        assert allowed.fetch(server.url("/img/2", host)).data == b"image /img/2", host
    assert server.hits["/img/2"] == 2


@pytest.mark.parametrize("host, kind", [
    ("169.254.169.254", "link-local"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.0.1", "private"), ("0.0.0.0", "unspecified"), ("100.64.0.1", "non-public"),
    ("[fe80::1]", "link-local"), ("[fd00::1]", "private"), ("[::ffff:169.254.169.254]", "link-local")])
def test_link_local_and_private_addresses_are_refused(host, kind):
    result = HttpFetcher(HttpConfig(connect_timeout_s=1.0)).fetch(f"http://{host}/latest/meta-data/")
    article = "an" if kind[0] in "aeiou" else "a"
    assert result.data is None and result.attempts == 1
    assert result.error == f"refused: {host.strip('[]')} is {article} {kind} address" + REFUSAL


def test_address_policy():
    import ipaddress

    def refusal(address, allowed=()):
        return address_refusal(ipaddress.ip_address(address), [ipaddress.ip_network(n) for n in allowed])

    assert refusal("93.184.216.34") is None and refusal("2606:4700::1111") is None
    assert refusal("::ffff:93.184.216.34") is None and refusal("64:ff9b::5db8:d822") is None
    assert refusal("64:ff9b::7f00:1") == "loopback" and refusal("2002:7f00:1::1") == "loopback"
    assert refusal("10.1.2.3") == "private" and refusal("10.1.2.3", ["10.0.0.0/8"]) is None
    assert refusal("::ffff:10.1.2.3", ["10.0.0.0/8"]) is None and refusal("10.1.2.3", ["::/0"]) == "private"


def test_redirects_are_followed_and_every_hop_is_checked(server):
    fetcher = HttpFetcher(HttpConfig(**FAST))
    followed = fetcher.fetch(server.url(f"/redirect/0?to={server.url('/img/3')}"))
    assert followed.data == b"image /img/3" and followed.attempts == 1
    for target, error in [
            (server.url("/img/4", "127.0.0.2"), "127.0.0.2 is a loopback address"),
            (server.url("/img/4", "[::1]"), "::1 is a loopback address"),
            ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
            ("http://10.0.0.1/", "10.0.0.1 is a private address")]:
        result = fetcher.fetch(server.url(f"/redirect/0?to={target}"))
        assert result.data is None and result.attempts == 1, target
        assert result.error == f"refused: {error} (redirected to {target}){REFUSAL}"
    loop = HttpFetcher(HttpConfig(**{**FAST, "max_redirects": 3})).fetch(server.url("/redirect/0"))
    assert loop.data is None and loop.error == "too many redirects (over 3)" and loop.attempts == 1
    assert server.hits["/redirect/3"] == 1 and server.hits["/redirect/4"] == 0
    assert server.hits["/img/4"] == 0
    assert "unsupported redirect" in fetcher.fetch(server.url("/redirect/0?to=file:///etc/passwd")).error


def test_config_is_validated():
    with pytest.raises(ValueError, match=r"^sources\.http\.allow_networks: '10.0.0.0/33' is not a network"):
        HttpConfig(allow_networks=["10.0.0.0/33"]).validate()
    with pytest.raises(ValueError, match=r"^sources\.http\.deadline_s must be > 0"):
        HttpConfig(deadline_s=0).validate()
    HttpConfig(allow_networks=["127.0.0.1/32", "10.0.0.0/8", "::1/128", "192.168.1.7"]).validate()
