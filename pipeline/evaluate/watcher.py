"""The gate watcher: polls a stage's checkpoint prefix and gates every new complete checkpoint
exactly once, with all of its state in object storage (`deco gate watch --stage NAME`). Any number of
watchers, on any hosts, may watch one stage at once.

Exactly once, across crashes, restarts and concurrent watchers:
- Done = the checkpoint has a gate_verdict.json. The verdict is created with a conditional write
  (create-if-absent), so even two evaluations racing to the end leave one verdict, the first.
- Evaluations are claimed: attempt n of a checkpoint is the object
  `<checkpoint>/gate/claims/<n:04d>.json` {watcher_id, token, state, heartbeat_unix, error, host, pid,
  ...}, also created with a conditional write, so exactly one watcher owns each attempt, and only the
  newest attempt counts. The owner renews its heartbeat while it works and ends the claim done,
  failed (the evaluation raised), interrupted (Ctrl-C, SIGTERM) or superseded (taken over meanwhile).
- Ownership is the claim's token, never the watcher id: a watcher treats a running claim as its own
  only when it issued that token itself (its earlier attempt whose end could not be recorded). Any
  other running claim belongs to a live watcher, and is left alone, until either its heartbeat is
  older than lease_s (abandoned: take the next attempt) or its process provably no longer exists (same
  host, boot and pid namespace, and that pid is gone or is another process: a watcher restarted on
  the same machine redoes its cut evaluation at once instead of waiting out the lease). Failed,
  interrupted and superseded attempts are retried; after max_attempts attempts the checkpoint is
  rejected as unevaluable rather than retried forever.
- A watcher whose claim was taken over while it was stalled (a paused process, a network partition
  longer than lease_s) notices before recording anything: it drops its result and ends its claim
  superseded, so the new owner's verdict is the one that stands. Its heartbeat only ever rewrites its
  own, older claim, which no longer decides anything.
- A crash between a passing verdict and promoted.json is repaired at the start of each poll.
Checkpoints without a manifest are never looked at; a manifest that lists missing files is a
corrupt checkpoint and gets a reject verdict without evaluation. Watcher ids are labels for logs and
verdicts: the default is `<stage>@<host>:<pid>:<8 random hex>`, unique per process; a given
--watcher-id is used as is, and two live watchers given the same id still never take each other's
claims (their tokens differ).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid

from deco.data.object_store import is_s3, open_store
from deco.pipeline.train.manifest import CheckpointError, list_checkpoints, read_manifest
from deco.pipeline.evaluate.gate import (VERDICT, ClaimLost, WeightsFor, create_exclusive, evaluate_checkpoint,
                                         read_verdict, reconcile_promotion, reject_unevaluable)
from deco.pipeline.evaluate.gate_config import GateConfig

log = logging.getLogger(__name__)
CLAIMS = "gate/claims"


def default_watcher_id(cfg: GateConfig) -> str:
    """Unique per process: `<stage>@<host>:<pid>:<8 random hex>`."""
    return f"{cfg.stage or 'stage'}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _start_ticks(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live process `pid` in our /proc; None when there is
    no such process (or only its zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _process_identity() -> dict:
    """What a claim records about the process holding it, so that a watcher on the same machine can
    tell whether that process still exists: host and pid, and on Linux the boot, the pid namespace
    and the process's start time (pid reuse); empty extras where /proc is not this process's own."""
    ident = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        if int(os.readlink("/proc/self")) == os.getpid():
            with open("/proc/sys/kernel/random/boot_id") as f:
                ident.update(boot_id=f.read().strip(), pid_ns=os.readlink("/proc/self/ns/pid"),
                             proc_start=_start_ticks(os.getpid()))
    except (OSError, ValueError):
        pass
    return ident


_PROCESS = _process_identity()


def holder_is_gone(claim: dict) -> bool:
    """True only when the process that holds `claim` provably no longer exists: it ran on this
    machine, in this boot and pid namespace, and its pid is now free or another process. Anything
    else (another host or container, a pid we may not signal, no /proc) is False: wait for the lease."""
    keys = ("host", "boot_id", "pid_ns")
    if _PROCESS.get("proc_start") is None or claim.get("proc_start") is None or not isinstance(claim.get("pid"), int):
        return False
    if any(claim.get(k) != _PROCESS.get(k) for k in keys):
        return False
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user: /proc may hide it, so judge by the lease
        return False
    except OSError:
        return False
    return _start_ticks(claim["pid"]) != claim["proc_start"]


class _Heartbeat(threading.Thread):
    """Renews a claim's heartbeat until stopped, so other watchers see the owner is alive. Stops
    renewing (and sets `superseded`) once a newer attempt exists: the claim was taken over."""

    def __init__(self, store, key: str, claim: dict, every_s: float):
        super().__init__(daemon=True)
        self.store, self.key, self.claim, self.every_s = store, key, claim, every_s
        self.stopped = threading.Event()
        self.superseded = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                if newer_attempt(self.store, self.claim["attempt"]) is not None:
                    log.warning("attempt %d was taken over by another watcher (no heartbeat for lease_s): "
                                "its result will be dropped", self.claim["attempt"])
                    self.superseded.set()
                    return
                self.claim["heartbeat_unix"] = time.time()
                self.store.put_bytes(self.key, json.dumps(self.claim).encode())
            except Exception as err:  # a failed renewal must not kill the evaluation: retry next beat
                log.warning("heartbeat of %s failed: %s", self.key, err)


def claim_numbers(store) -> list[tuple[int, str]]:
    """(attempt number, key) of a checkpoint's claims, oldest first."""
    found = []
    for key in store.list(CLAIMS):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            found.append((int(name[:-5]), key))
    return sorted(found)


def newer_attempt(store, number: int) -> int | None:
    """The newest attempt after `number`, if any (then attempt `number` no longer decides anything)."""
    newest = claim_numbers(store)
    return newest[-1][0] if newest and newest[-1][0] > number else None


class GateWatcher:
    def __init__(self, cfg: GateConfig, watcher_id: str | None = None, weights_for: WeightsFor | None = None):
        if not cfg.stage_uri:
            raise ValueError("the gate config names no stage_uri (set it, or pass --stage-uri)")
        self.cfg = cfg
        self.id = watcher_id or default_watcher_id(cfg)
        self.weights_for = weights_for
        self._done: dict[int, dict] = {}
        self._detector = None
        self._tokens: set[str] = set()  # the claims this watcher issued: the only ones it may call its own

    # -- claims -------------------------------------------------------------------------------

    _claims = staticmethod(claim_numbers)

    def _next_attempt(self, store) -> tuple[int | None, dict | None]:
        """(attempt number to take, or None to leave the checkpoint; the newest claim). Only the
        newest claim counts; a running one is taken over only when this watcher issued it (and so is
        not running it: its end went unrecorded), when its holder's process is provably gone, or when
        its heartbeat is older than lease_s. A live holder's claim is never taken, whatever its id."""
        claims = self._claims(store)
        if not claims:
            return 1, None
        number, key = claims[-1]
        try:
            claim = json.loads(store.get_bytes(key))
        except ValueError:  # unreadable: treat the attempt as failed and move on
            return number + 1, {"state": "failed", "error": f"unreadable claim {key}"}
        state, holder = claim.get("state"), claim.get("watcher_id")
        if state == "done" and store.exists(VERDICT):  # the verdict is recorded before the claim says done
            return None, claim
        if state == "running":
            age = time.time() - float(claim.get("heartbeat_unix") or 0)
            if claim.get("token") in self._tokens:
                log.warning("redoing attempt %d: this watcher (%s) did not record its end", number, self.id)
            elif holder_is_gone(claim):
                log.warning("claim %s of %s: its process (pid %s on this host) is gone, taking over", key, holder,
                            claim.get("pid"))
            elif age < self.cfg.lease_s:
                return None, claim
            else:
                log.warning("claim %s of %s: no heartbeat for %.0f s (lease %.0f s), taking over", key, holder, age,
                            self.cfg.lease_s)
        return number + 1, claim

    # -- one poll -----------------------------------------------------------------------------

    def poll_once(self, on_verdict=None) -> list[dict]:
        """Gate every complete checkpoint that has no verdict yet; returns this poll's verdicts
        (each also passed to `on_verdict` as soon as it is recorded)."""
        refs = list_checkpoints(self.cfg.stage_uri)
        for ref in refs:
            if ref.step not in self._done:
                verdict = read_verdict(ref.uri)
                if verdict is not None:
                    self._done[ref.step] = verdict
        reconcile_promotion(self.cfg.stage_uri, self.cfg.stage, self._done)
        made = []
        for ref in refs:
            if ref.step in self._done:
                continue
            verdict = self._gate(ref)
            if verdict is not None:
                self._done[ref.step] = verdict
                made.append(verdict)
                if on_verdict is not None:
                    on_verdict(verdict)
        return made

    def _gate(self, ref) -> dict | None:
        store = open_store(ref.uri)
        try:
            if read_manifest(ref.uri, verify_files=True) is None:
                return None  # removed since it was listed (retention): nothing to gate
        except CheckpointError as err:
            log.error("%s", err)
            return reject_unevaluable(ref.uri, self.cfg, f"corrupt checkpoint: {err}", self.id, 0)
        number, previous = self._next_attempt(store)
        if number is None:
            log.info("step %d is %s by %s", ref.step, "done" if previous.get("state") == "done" else "being evaluated",
                     previous.get("watcher_id"))
            return None  # a verdict recorded since this poll began is picked up by the next poll
        if previous is not None and store.exists(VERDICT):
            return None  # recorded since this poll began: picked up by the next poll
        if number > self.cfg.max_attempts:
            last = (previous or {}).get("error") or "interrupted"
            return reject_unevaluable(ref.uri, self.cfg, f"{number - 1} evaluation attempts failed or were "
                                      f"interrupted (last: {last})", self.id, number - 1)
        key = f"{CLAIMS}/{number:04d}.json"
        token = uuid.uuid4().hex
        claim = {"watcher_id": self.id, "token": token, "attempt": number, "state": "running", **_PROCESS,
                 "claimed_unix": time.time(), "heartbeat_unix": time.time(), "error": None}
        if not create_exclusive(store, key, json.dumps(claim).encode()):
            log.info("attempt %d of step %d was claimed by another watcher", number, ref.step)
            return None
        self._tokens.add(token)
        log.info("evaluating step %d (attempt %d) as %s", ref.step, number, self.id)
        heartbeat = _Heartbeat(store, key, claim, every_s=max(1.0, min(30.0, self.cfg.lease_s / 4)))
        heartbeat.start()

        def owns() -> bool:  # asked right before the verdict is recorded
            return not heartbeat.superseded.is_set() and newer_attempt(store, number) is None

        verdict = None
        try:
            if self._detector is None:
                from deco.pipeline.evaluate.geneval.detectors import build_detector

                self._detector = build_detector(self.cfg.detector)
            verdict = evaluate_checkpoint(ref.uri, self.cfg, self.weights_for, detector=self._detector,
                                          watcher_id=self.id, attempt=number, owns=owns)
            claim["state"] = "done"
        except ClaimLost as err:  # taken over while this watcher stalled: the new owner's verdict stands
            log.warning("step %d, attempt %d: %s", ref.step, number, err)
            claim.update(state="superseded", error=str(err))
        except Exception as err:  # recorded in the claim and retried on a later poll, up to max_attempts
            log.exception("evaluation of step %d failed", ref.step)
            claim.update(state="failed", error=f"{type(err).__name__}: {err}")
        except BaseException as err:  # Ctrl-C, SIGTERM: the next watcher redoes it at once
            claim.update(state="interrupted", error=f"interrupted ({type(err).__name__})")
            raise
        finally:
            heartbeat.stopped.set()
            heartbeat.join()
            claim["heartbeat_unix"] = time.time()
            try:  # only ever this watcher's own attempt: once superseded, it no longer decides anything
                store.put_bytes(key, json.dumps(claim).encode())
            except Exception as err:
                if verdict is None and claim["state"] != "interrupted":
                    raise
                log.warning("could not record the end (%s) of attempt %d of step %d: %s", claim["state"], number,
                            ref.step, err)
        if verdict is not None:
            log.info("step %d: %s %s", ref.step, verdict["decision"], "; ".join(verdict["reasons"]))
        return verdict

    def preflight(self) -> None:
        """Fail at start on what would fail every evaluation (a missing bucket, prompt file or
        detector weights, prompts the detector cannot judge), so that a misconfigured watcher
        never rejects good checkpoints as unevaluable."""
        from deco.pipeline.config import ConfigError
        from deco.pipeline.evaluate.geneval.detectors import build_detector
        from deco.pipeline.evaluate.geneval.prompts import resolve_prompts

        if is_s3(self.cfg.stage_uri):
            open_store(self.cfg.stage_uri).check(create=False)
        prompts = resolve_prompts(self.cfg.prompts, self.cfg.synthetic_per_task, self.cfg.synthetic_seed)
        if self._detector is None:
            self._detector = build_detector(self.cfg.detector)
        unknown = sorted(set().union(*(p.classes() for p in prompts)) - set(self._detector.classes))
        if unknown:
            raise ConfigError(f"the {self._detector.name} detector cannot judge prompt classes {unknown[:5]}")

    def run(self, max_polls: int | None = None, on_verdict=None) -> list[dict]:
        """Poll every cfg.poll_s seconds; stop after max_polls polls (None: forever)."""
        verdicts, polls = [], 0
        self.preflight()
        while max_polls is None or polls < max_polls:
            if polls:
                time.sleep(self.cfg.poll_s)
            polls += 1
            try:
                verdicts += self.poll_once(on_verdict)
            except Exception:  # storage hiccups must not end a long-running watcher: next poll retries
                if max_polls is not None and polls >= max_polls:
                    raise
                log.exception("poll %d failed; retrying in %.0f s", polls, self.cfg.poll_s)
        return verdicts


__all__ = ["GateWatcher", "default_watcher_id", "CLAIMS", "VERDICT"]
