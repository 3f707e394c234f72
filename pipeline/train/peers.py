"""When a collective fails because a rank is gone: which rank, on which node, during what.

A rank whose peer dies (SIGKILL, OOM killer, a node that fails) gets a RuntimeError from deep
inside gloo or NCCL ("Connection reset by peer", "Connection closed by peer", a timeout) that names
an address, not a rank. So every rank listens on a TCP port of its own (a daemon thread accepts and
closes connections; nothing is ever read or written) and publishes (rank, node, host, address) to
all ranks once, at start. After a failed collective a survivor connects to every other rank's
port: a live process accepts; a dead process's port refuses, a dead or unreachable node's times
out. The ranks that do not answer are the lost ones. This works when the rendezvous store died
with its node too, and needs nothing from the broken process group.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch.distributed as dist

PROBE_TIMEOUT_S = 3.0
SURVIVOR_GRACE_S = PROBE_TIMEOUT_S + 1.0  # a survivor stays reachable this long for the others' probes
# Markers of a failed collective in the messages of RuntimeErrors that are not a torch DistError.
_COLLECTIVE_MARKERS = ("gloo", "NCCL", "nccl", "ProcessGroup", "Connection closed by peer", "Connection reset by peer")


class PeerLostError(RuntimeError):
    """A collective failed; the message is one line. `report`: this rank is the one that says it
    (the lowest rank still answering), the others exit quietly."""

    def __init__(self, message: str, report: bool):
        super().__init__(message)
        self.report = report


def is_collective_failure(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _COLLECTIVE_MARKERS)


def _is_loader_worker_killed(err: BaseException) -> bool:
    # A launcher that stops a node's ranks signals their process groups, data loader workers included.
    return isinstance(err, RuntimeError) and "DataLoader worker" in str(err) and "killed by signal" in str(err)


def peer_failure(err: BaseException) -> BaseException | None:
    """The link of `err`'s chain that says a peer or the job went away: a failed collective, or a
    data loader worker killed by a signal (a launcher tearing the job down after another node
    failed; it may surface while the collective's error unwinds, or before it). None otherwise."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
    return (next((e for e in chain if is_collective_failure(e)), None)
            or next((e for e in chain if _is_loader_worker_killed(e)), None))


@dataclass(frozen=True)
class Peer:
    rank: int
    node: int
    host: str
    address: tuple[str, int]


def _node_index(rank: int, local_world_size: int) -> int:
    # torchrun: GROUP_RANK; deepspeed launcher: CROSS_RANK; else ranks are numbered node by node.
    for name in ("GROUP_RANK", "CROSS_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return rank // max(local_world_size, 1)


def _reachable_address() -> str:
    """This host's address on the route to the job's master (the interface the job talks over)."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))  # UDP: sends nothing
            return sock.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


@dataclass
class RankStatus:
    """What this rank is doing (for the message) and, once the job is joined, the peer table."""
    rank: int
    world_size: int
    local_world_size: int
    activity: str = "start-up"
    peers: list[Peer] = field(default_factory=list)
    _listener: socket.socket | None = None

    def publish(self) -> None:
        """Every rank calls, right after joining the process group (one all_gather)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("0.0.0.0", 0))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, name="deco-peer-liveness", daemon=True).start()
        me = Peer(self.rank, _node_index(self.rank, self.local_world_size), socket.gethostname(),
                  (_reachable_address(), listener.getsockname()[1]))
        gathered: list[Peer] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, me)
        self.peers = gathered

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.close()

    def lost(self, err: BaseException) -> PeerLostError:
        """The one-line error for a failed collective, after probing every other rank."""
        detail = _first_sentence(err)
        others = [p for p in self.peers if p.rank != self.rank]
        if not others:
            return PeerLostError(f"lost contact with the other ranks during {self.activity} ({detail}); "
                                 f"rerun with --resume auto", report=True)
        with ThreadPoolExecutor(max_workers=min(64, len(others))) as pool:
            answers = dict(zip((p.rank for p in others), pool.map(_answers, (p.address for p in others))))
        lost = [p for p in others if not answers[p.rank]]
        alive = [p.rank for p in others if answers[p.rank]]
        report = not any(rank < self.rank for rank in alive)
        if alive:
            # Stay reachable a little longer: the other survivors are probing too.
            time.sleep(SURVIVOR_GRACE_S)
        if lost:
            return PeerLostError(f"lost contact with {_describe(lost)} during {self.activity}: the process or its "
                                 f"node is gone; rerun with --resume auto", report=report)
        what = "a collective failed" if is_collective_failure(err) else "this rank was stopped"
        return PeerLostError(f"{what} during {self.activity} although every rank still answers "
                             f"({detail}); check the other ranks' logs, then rerun with --resume auto", report=report)


def tell_launcher(message: str) -> None:
    """torchrun's failure summary shows this message (its 'traceback' field) instead of pointing to
    its error-handling docs: the worker error file, in the form torchrun's own @record writes."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as out:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                    "timestamp": str(int(time.time()))}}}, out)
    except OSError:
        pass


def _answers(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _describe(lost: list[Peer]) -> str:
    """'rank 1 (node 1, host a)', 'ranks 8-15 (node 1, host b)', several nodes joined by '; '."""
    by_node: dict[tuple[int, str], list[int]] = {}
    for peer in lost:
        by_node.setdefault((peer.node, peer.host), []).append(peer.rank)
    parts = []
    for (node, host), ranks in sorted(by_node.items()):
        word = "rank" if len(ranks) == 1 else "ranks"
        parts.append(f"{word} {_ranges(sorted(ranks))} (node {node}, host {host})")
    return "; ".join(parts)


def _ranges(ranks: list[int]) -> str:
    spans, start = [], ranks[0]
    for before, after in zip(ranks, ranks[1:] + [None]):
        if after != before + 1:
            spans.append(str(start) if start == before else f"{start}-{before}")
            start = after
    return ", ".join(spans)


def _first_sentence(err: BaseException) -> str:
    """gloo's message without its source location and advice: 'Read error [10.0.0.2]:57050:
    Connection reset by peer'."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically")[0].rstrip(".")
