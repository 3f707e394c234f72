"""The gate watcher: polls a stage's checkpoint prefix and gates every new complete checkpoint
exactly once, with all of its state in object storage (`deco gate watch --stage NAME`).

Exactly once, across crashes and restarts:
- Done = the checkpoint has a gate_verdict.json. The verdict is created with a conditional write
  (create-if-absent), so even two evaluations racing to the end leave one verdict, the first.
- Evaluations are claimed: attempt n of a checkpoint is the object
  `<checkpoint>/gate/claims/<n:04d>.json` {watcher_id, token, state, heartbeat_unix, error}, also
  created with a conditional write, so exactly one watcher owns each attempt. The owner renews its
  heartbeat while it works and marks the claim failed when the evaluation raises.
- On each poll, for a checkpoint without a verdict, the newest claim decides: none, or failed -> take
  the next attempt; running and this watcher's own id -> it was interrupted (this watcher restarted):
  redo it as the next attempt; running under another id with a fresh heartbeat -> leave it; with a
  heartbeat older than lease_s -> abandoned: take the next attempt. After max_attempts attempts the
  checkpoint is rejected as unevaluable rather than retried forever.
- A crash between a passing verdict and promoted.json is repaired at the start of each poll.
Checkpoints without a manifest are never looked at; a manifest that lists missing files is a
corrupt checkpoint and gets a reject verdict without evaluation. Give each concurrently running
watcher its own --watcher-id (default: <stage>@<host>); a restarted watcher should keep its id.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid

from deco.data.object_store import is_s3, open_store
from deco.pipeline.train.manifest import CheckpointError, list_checkpoints, read_manifest
from deco.pipeline.evaluate.gate import (VERDICT, WeightsFor, create_exclusive, evaluate_checkpoint, read_verdict,
                                reconcile_promotion, reject_unevaluable)
from deco.pipeline.evaluate.gate_config import GateConfig

log = logging.getLogger(__name__)
CLAIMS = "gate/claims"


def default_watcher_id(cfg: GateConfig) -> str:
    return f"{cfg.stage or 'stage'}@{socket.gethostname()}"


class _Heartbeat(threading.Thread):
    """Renews a claim's heartbeat until stopped, so other watchers see the owner is alive."""

    def __init__(self, store, key: str, claim: dict, every_s: float):
        super().__init__(daemon=True)
        self.store, self.key, self.claim, self.every_s = store, key, claim, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.claim["heartbeat_unix"] = time.time()
                self.store.put_bytes(self.key, json.dumps(self.claim).encode())
            except Exception as err:  # a failed renewal must not kill the evaluation: retry next beat
                log.warning("heartbeat of %s failed: %s", self.key, err)


class GateWatcher:
    def __init__(self, cfg: GateConfig, watcher_id: str | None = None, weights_for: WeightsFor | None = None):
        if not cfg.stage_uri:
            raise ValueError("the gate config names no stage_uri (set it, or pass --stage-uri)")
        self.cfg = cfg
        self.id = watcher_id or default_watcher_id(cfg)
        self.weights_for = weights_for
        self._done: dict[int, dict] = {}
        self._detector = None

    # -- claims -------------------------------------------------------------------------------

    @staticmethod
    def _claims(store) -> list[tuple[int, str]]:
        found = []
        for key in store.list(CLAIMS):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                found.append((int(name[:-5]), key))
        return sorted(found)

    def _next_attempt(self, store) -> tuple[int | None, dict | None]:
        """(attempt number to take, or None to leave the checkpoint; the newest claim)."""
        claims = self._claims(store)
        if not claims:
            return 1, None
        number, key = claims[-1]
        try:
            claim = json.loads(store.get_bytes(key))
        except ValueError:  # unreadable: treat the attempt as failed and move on
            return number + 1, {"state": "failed", "error": f"unreadable claim {key}"}
        if claim.get("state") == "running" and claim.get("watcher_id") != self.id:
            if time.time() - claim.get("heartbeat_unix", 0) < self.cfg.lease_s:
                return None, claim
            log.warning("claim %s of %s: no heartbeat for %.0f s, taking over", key, claim.get("watcher_id"),
                        time.time() - claim.get("heartbeat_unix", 0))
        elif claim.get("state") == "running":
            log.warning("redoing attempt %d: this watcher (%s) was interrupted during it", number, self.id)
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
            log.info("step %d is being evaluated by %s", ref.step, previous.get("watcher_id"))
            return None
        if number > self.cfg.max_attempts:
            last = (previous or {}).get("error") or "interrupted"
            return reject_unevaluable(ref.uri, self.cfg, f"{number - 1} evaluation attempts failed or were "
                                      f"interrupted (last: {last})", self.id, number - 1)
        key = f"{CLAIMS}/{number:04d}.json"
        claim = {"watcher_id": self.id, "token": uuid.uuid4().hex, "attempt": number, "state": "running",
                 "host": socket.gethostname(), "claimed_unix": time.time(), "heartbeat_unix": time.time(), "error": None}
        if not create_exclusive(store, key, json.dumps(claim).encode()):
            log.info("attempt %d of step %d was claimed by another watcher", number, ref.step)
            return None
        log.info("evaluating step %d (attempt %d) as %s", ref.step, number, self.id)
        heartbeat = _Heartbeat(store, key, claim, every_s=max(1.0, min(30.0, self.cfg.lease_s / 4)))
        heartbeat.start()
        try:
            if self._detector is None:
                from deco.pipeline.evaluate.geneval.detectors import build_detector

                self._detector = build_detector(self.cfg.detector)
            verdict = evaluate_checkpoint(ref.uri, self.cfg, self.weights_for, detector=self._detector,
                                          watcher_id=self.id, attempt=number)
            claim["state"] = "done"
        except Exception as err:  # recorded in the claim and retried on a later poll, up to max_attempts
            log.exception("evaluation of step %d failed", ref.step)
            claim.update(state="failed", error=f"{type(err).__name__}: {err}")
            verdict = None
        finally:
            heartbeat.stopped.set()
            heartbeat.join()
        claim["heartbeat_unix"] = time.time()
        store.put_bytes(key, json.dumps(claim).encode())
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
