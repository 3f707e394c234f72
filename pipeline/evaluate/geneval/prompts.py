"""GenEval prompt sets: the packaged official one (553 prompts, MIT, data/geneval_prompts/) and any
file in its `evaluation_metadata.jsonl` format, validated line by line.

A line is one JSON object: `tag` (one of TASKS), `prompt`, `include` (clauses that must all hold)
and, for counting, `exclude` (clauses any of which fails the image). A clause has `class`, `count`,
optional `color` (one of COLORS) and optional `position` = [relation, index of the reference
clause in `include`]. The object read from the file is kept as is (key order included), because the
official layout stores it verbatim in each prompt folder's metadata.jsonl.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import deco.data
from deco.pipeline.config import ConfigError

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")

PROMPTS_DIR = Path(deco.data.__file__).resolve().parent / "geneval_prompts"
OFFICIAL_METADATA = PROMPTS_DIR / "evaluation_metadata.jsonl"
OFFICIAL_OBJECT_NAMES = PROMPTS_DIR / "object_names.txt"
# sha256 of the files as published (djghosh13/geneval af4902f): a modified copy would silently
# make scores incomparable with published ones, so loading the official set checks it.
OFFICIAL_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
OFFICIAL_COUNT = 553

_LINE_KEYS = {"tag", "prompt", "include", "exclude"}
_CLAUSE_KEYS = {"class", "count", "color", "position"}


@dataclass(eq=False)
class Prompt:
    index: int          # position in the prompt set: the official layout's folder number
    metadata: dict      # the JSON object exactly as read

    @property
    def tag(self) -> str:
        return self.metadata["tag"]

    @property
    def text(self) -> str:
        return self.metadata["prompt"]

    def classes(self) -> set[str]:
        clauses = self.metadata["include"] + self.metadata.get("exclude", [])
        return {clause["class"] for clause in clauses}


def object_names() -> list[str]:
    """The 80 COCO class names in detector order, as GenEval spells them."""
    return [line.strip() for line in OFFICIAL_OBJECT_NAMES.read_text().splitlines() if line.strip()]


def _check_clause(clause, where: str, classes: set[str] | None, include_len: int | None, own_index: int | None) -> None:
    if not isinstance(clause, dict):
        raise ConfigError(f"{where}: a clause must be a JSON object, got {clause!r}")
    unknown = set(clause) - _CLAUSE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown clause key(s) {sorted(unknown)}; valid: {sorted(_CLAUSE_KEYS)}")
    name = clause.get("class")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: clause needs a non-empty string 'class'")
    if classes is not None and name not in classes:
        raise ConfigError(f"{where}: unknown class {name!r}")
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"{where}: 'count' must be an integer >= 1, got {count!r}")
    if "color" in clause and clause["color"] not in COLORS:
        raise ConfigError(f"{where}: unknown color {clause['color']!r}; valid: {', '.join(COLORS)}")
    if "position" in clause:
        if include_len is None:
            raise ConfigError(f"{where}: 'position' is only allowed in include clauses")
        position = clause["position"]
        if (not isinstance(position, list) or len(position) != 2 or position[0] not in RELATIONS
                or isinstance(position[1], bool) or not isinstance(position[1], int)):
            raise ConfigError(f"{where}: 'position' must be [relation, clause index] with relation in "
                              f"{list(RELATIONS)}, got {position!r}")
        if not 0 <= position[1] < include_len or position[1] == own_index:
            raise ConfigError(f"{where}: 'position' refers to include clause {position[1]}, which is not "
                              f"another clause of this prompt")


def validate_metadata(metadata, where: str, classes: set[str] | None = None) -> None:
    """Raise ConfigError naming `where` when `metadata` is not a valid GenEval prompt object."""
    if not isinstance(metadata, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    unknown = set(metadata) - _LINE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(_LINE_KEYS)}")
    if metadata.get("tag") not in TASKS:
        raise ConfigError(f"{where}: tag {metadata.get('tag')!r} is not a GenEval task ({', '.join(TASKS)})")
    if not isinstance(metadata.get("prompt"), str) or not metadata["prompt"].strip():
        raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ConfigError(f"{where}: 'include' must be a non-empty list of clauses")
    for i, clause in enumerate(include):
        _check_clause(clause, f"{where} include[{i}]", classes, len(include), i)
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        raise ConfigError(f"{where}: 'exclude' must be a list of clauses")
    for i, clause in enumerate(exclude):
        _check_clause(clause, f"{where} exclude[{i}]", classes, None, None)


def parse_prompts(lines: list[str], source: str, classes: set[str] | None = None) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            metadata = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}:{number}: invalid JSON: {err}") from None
        validate_metadata(metadata, f"{source}:{number}", classes)
        prompts.append(Prompt(index=len(prompts), metadata=metadata))
    if not prompts:
        raise ConfigError(f"{source}: no prompts")
    return prompts


def load_prompts(path: str | Path, classes: set[str] | None = None) -> list[Prompt]:
    """Prompts of an evaluation_metadata.jsonl-format file; ConfigError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return parse_prompts(path.read_text(encoding="utf-8").splitlines(), str(path), classes)


def official_prompts() -> list[Prompt]:
    """The 553 GenEval prompts, checked against the published file's digest."""
    raw = OFFICIAL_METADATA.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != OFFICIAL_SHA256:
        raise ConfigError(f"{OFFICIAL_METADATA} was modified (sha256 {digest}, published {OFFICIAL_SHA256}): "
                          "scores on it would not be comparable with published GenEval numbers")
    prompts = parse_prompts(raw.decode("utf-8").splitlines(), str(OFFICIAL_METADATA), set(object_names()))
    assert len(prompts) == OFFICIAL_COUNT
    return prompts


def prompts_digest(prompts: list[Prompt]) -> str:
    """Identifies a prompt set: gates compare scores only between evaluations on the same set."""
    canonical = "\n".join(json.dumps(p.metadata, sort_keys=True) for p in prompts)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_prompts(prompts: list[dict], path: str | Path) -> Path:
    """Write prompt objects one per line, in the official file's style (keys as given)."""
    for i, metadata in enumerate(prompts):
        validate_metadata(metadata, f"prompt {i}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(m) + "\n" for m in prompts), encoding="utf-8")
    return path


def resolve_prompts(spec: str, synthetic_per_task: int = 0, synthetic_seed: int = 0) -> list[Prompt]:
    """`official`, `synthetic` (the synthetic vocabulary's set) or a path to a prompt file."""
    if spec == "official":
        return official_prompts()
    if spec == "synthetic":
        from deco.pipeline.evaluate.geneval.synthetic_prompts import synthetic_prompts

        rows = synthetic_prompts(per_task=synthetic_per_task, seed=synthetic_seed)
        return parse_prompts([json.dumps(r) for r in rows], "synthetic prompts")
    return load_prompts(spec)
