"""The guards of one HTTP fetch (data/http_fetch.py): which addresses it may reach, checked where the
connection is opened, and the deadline that shuts its sockets.

Addresses: the host is resolved once, every address it resolves to is checked, and the socket is
connected to an address that passed - never to a second resolution, so DNS rebinding between the
check and the connect is not possible. The Host header and TLS SNI still carry the name.
"""
from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from typing import Sequence


def parse_networks(values: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value))
        except ValueError as err:
            raise ValueError(f"sources.http.allow_networks: {value!r} is not a network "
                             f"(a CIDR such as 10.0.0.0/8): {err}") from None
    return networks


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches: IPv4-mapped, 6to4 and NAT64 forms."""
    if ip.version == 4:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                    allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """Why a fetch may not reach `ip` ("loopback", "link-local", "private", ...), or None: a public
    address, or one in an `allowed` network. An IPv6 form of an IPv4 address is judged as that."""
    embedded = _embedded_ipv4(ip)
    for candidate in (ip, embedded):
        if candidate is not None and any(candidate in net for net in allowed if net.version == candidate.version):
            return None
    ip = embedded or ip
    for kind, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("unspecified", ip.is_unspecified), ("multicast", ip.is_multicast),
                       ("private", ip.is_private), ("reserved", ip.is_reserved), ("non-public", not ip.is_global)):
        if test:
            return kind
    return None


class AddressRefused(Exception):
    """A URL's host is, or resolves only to, addresses that the configuration does not allow."""

    def __init__(self, host: str, address: str, kind: str):
        what = f"{host} is" if host == address else f"{host} resolves to {address},"
        super().__init__(f"{what} {'an' if kind[0] in 'aeiou' else 'a'} {kind} address")


class Deadline:
    """The end of one fetch. A timer marks it expired at `deadline_s` and shuts down the socket of
    every connection the fetch has used, which ends a read blocked on a slow server at once."""

    def __init__(self, seconds: float):
        self.seconds, self.at, self.expired = seconds, time.monotonic() + seconds, False
        self._connections: list[_CheckedConnection] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def watch(self, connection: _CheckedConnection) -> None:
        with self._lock:
            self._connections.append(connection)
            expired = self.expired
        if expired:
            _shut(connection)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            connections, self._connections = self._connections, []
        for connection in connections:
            _shut(connection)

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._connections = []


def _shut(connection: _CheckedConnection) -> None:
    # TLS wrapping moves the TCP socket's descriptor into an SSLSocket, and http.client drops .sock
    # from a connection whose response ends with the connection (its body still reads from that
    # socket), so the sockets the connection opened are kept and all are tried.
    # socket.socket.shutdown on an SSLSocket acts on the descriptor, not on TLS: a blocked read,
    # plain or TLS, sees the end of the stream at once.
    for sock in (connection.sock, connection._live_sock, connection._raw_sock):
        if isinstance(sock, socket.socket):
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:  # closed or detached
                pass


active = threading.local()  # .deadline: the Deadline of the fetch this thread is running


class _CheckedConnection:
    """Mixed into urllib3's HTTP(S)Connection: resolves the host once, refuses the addresses that
    `allowed` does not let through, and connects to one that passed (the Host header and TLS SNI
    keep the name). Its sockets are handed to the running fetch's deadline."""

    allowed: list | None = []  # None: no check (connections to a proxy, which resolves names itself)
    _raw_sock: socket.socket | None = None   # the TCP socket _new_conn opened
    _live_sock: socket.socket | None = None  # what connect() made of it (an SSLSocket under TLS)

    def connect(self) -> None:
        super().connect()
        self._live_sock = self.sock

    def _new_conn(self) -> socket.socket:
        from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
        from urllib3.util.connection import allowed_gai_family, create_connection

        host = self._dns_host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, self.port, allowed_gai_family(), socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise NameResolutionError(self.host, self, err) from err
        addresses, refused = [], None
        for *_, sockaddr in infos:
            kind = None if self.allowed is None else address_refusal(ipaddress.ip_address(sockaddr[0]), self.allowed)
            if kind is None:
                if sockaddr[0] not in addresses:
                    addresses.append(sockaddr[0])
            elif refused is None:
                refused = AddressRefused(host, sockaddr[0], kind)
        if not addresses:
            raise refused or NewConnectionError(self, f"no address for {host}")
        deadline, error = getattr(active, "deadline", None), None
        for address in addresses:
            if deadline is not None and deadline.expired:
                break
            try:
                sock = create_connection((address, self.port), self.timeout, source_address=self.source_address,
                                         socket_options=self.socket_options)
            except socket.timeout as err:
                error = ConnectTimeoutError(self, f"Connection to {self.host} ({address}) timed out. "
                                                  f"(connect timeout={self.timeout})")
                error.__cause__ = err
            except OSError as err:
                error = NewConnectionError(self, f"Failed to establish a new connection to {address}: {err}")
                error.__cause__ = err
            else:
                sys.audit("http.client.connect", self, self.host, self.port)
                self._raw_sock = sock
                if deadline is not None:
                    deadline.watch(self)
                return sock
        raise error or ConnectTimeoutError(self, f"Connection to {self.host}: deadline passed")

    def request(self, *args, **kwargs):  # a pooled connection serves the fetch running now
        deadline = getattr(active, "deadline", None)
        if deadline is not None and self.sock is not None:
            deadline.watch(self)
        return super().request(*args, **kwargs)


def checked_adapter(allowed: list, **adapter_kw):
    """A requests HTTPAdapter whose connections are _CheckedConnections for `allowed`; connections
    to an HTTP proxy from the environment serve deadlines too, but their address is not checked."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def pools(allowed_here):
        connection = type("Connection", (_CheckedConnection, HTTPConnection), {"allowed": allowed_here})
        tls_connection = type("TLSConnection", (_CheckedConnection, HTTPSConnection), {"allowed": allowed_here})
        return {"http": type("Pool", (HTTPConnectionPool,), {"ConnectionCls": connection}),
                "https": type("TLSPool", (HTTPSConnectionPool,), {"ConnectionCls": tls_connection})}

    checked, unchecked = pools(allowed), pools(None)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = checked

        def proxy_manager_for(self, proxy, **proxy_kwargs):
            manager = super().proxy_manager_for(proxy, **proxy_kwargs)
            if not proxy.lower().startswith("socks"):
                manager.pool_classes_by_scheme = unchecked
            return manager

    return Adapter(**adapter_kw)
