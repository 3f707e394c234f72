"""The four code rooms import only downwards (model <- data <- orchestration <- pipeline), and
DeepSpeed's internals stay in orchestration/zero3. Read from the source with `ast`, so a lazy import
inside a function counts as much as one at the top of a file."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ["model", "data", "orchestration", "pipeline"]          # lowest first
# The one upward arrow kept on purpose (README, Layout): curation's encoders are the model's.
ALLOWED_UP = {("data/transforms.py", "model"), ("data/filters.py", "model")}
DEEPSPEED_INTERNALS = ("ds_tensor", "ds_id", "ds_numel", "ds_shape", "ds_persist", "zero_pp_rank",
                       "safe_get_local", "safe_set_local", "GatheredParameters")


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "deco" and len(parts) > 1 and parts[1] in ROOMS:
                rooms.add(parts[1])
    return rooms


def test_imports_point_only_down_the_rooms():
    upward = []
    for level, room in enumerate(ROOMS):
        for path in sorted((ROOT / room).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            for target in imported_rooms(path):
                if ROOMS.index(target) > level and (relative, target) not in ALLOWED_UP:
                    upward.append(f"{relative} imports deco.{target}")
    assert upward == []


def test_only_orchestration_zero3_knows_deepspeed_internals():
    leaks = []
    for room in ("model", "data", "pipeline"):
        for path in sorted((ROOT / room).rglob("*.py")):
            text = path.read_text()
            leaks += [f"{path.relative_to(ROOT)}: {word}" for word in DEEPSPEED_INTERNALS if word in text]
            if "import deepspeed" in text or "from deepspeed" in text:
                leaks.append(f"{path.relative_to(ROOT)}: imports deepspeed")
    for path in sorted((ROOT / "orchestration").glob("*.py")):  # the Ray and launcher files
        text = path.read_text()
        leaks += [f"{path.relative_to(ROOT)}: {word}" for word in DEEPSPEED_INTERNALS if word in text]
    assert leaks == []
