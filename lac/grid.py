"""Prompt grids: a baseline (B), personas (X) and tasks (Y), optionally persona markers.

A grid is data. The shipped ones come from the paper's appendix
(`lac/data/paper-grids.yaml`); a user's own grid uses the same schema:

    baseline: {persona: ..., task: ...}
    personas: {key: text, ...}
    tasks: {key: text, ...}
    markers: {persona_key: [marker, ...], ...}   # optional
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lac.errors import LacError

DATA_DIR = Path(__file__).parent / "data"


class GridError(LacError):
    """A grid file or grid config that lac cannot use."""


@dataclass(frozen=True)
class Cell:
    persona: str  # persona key
    task: str  # task key

    @property
    def key(self) -> str:
        return f"{self.persona}__{self.task}"


@dataclass(frozen=True)
class Grid:
    name: str
    baseline_persona: str
    baseline_task: str
    personas: dict[str, str]
    tasks: dict[str, str]
    markers: dict[str, list[str]] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        return [Cell(p, t) for p in self.personas for t in self.tasks]

    def content_hash(self) -> str:
        """Identity of the grid's text, so caches keyed on it survive renames."""
        blob = json.dumps(
            [self.baseline_persona, self.baseline_task, self.personas, self.tasks],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML silently keeps the last of duplicate keys; a grid must not."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise GridError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def load_yaml(path: str | Path) -> Any:
    """Read YAML, refusing duplicate keys, with errors that name the file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise GridError(f"grid file {str(path)!r} is a directory; give a YAML file (baseline, personas, tasks)")
    if not path.is_file():
        raise GridError(f"grid file not found: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GridError(f"grid file {str(path)!r} is unreadable: {e}") from e
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except GridError as e:
        raise GridError(f"grid file {str(path)!r}: {e}") from e
    except yaml.YAMLError as e:
        raise GridError(f"grid file {str(path)!r} is not valid YAML: {e}") from e


def _text_map(data: Any, what: str, where: str) -> dict[str, str]:
    if not isinstance(data, Mapping) or not data:
        raise GridError(f"{where}: '{what}' must be a non-empty mapping key -> text, got {data!r}")
    out: dict[str, str] = {}
    given: dict[str, Any] = {}
    for k, v in data.items():
        if str(k) in given:
            raise GridError(f"{where}: {what} keys {given[str(k)]!r} and {k!r} collide once read as text; "
                            "keys must be distinct strings")
        given[str(k)] = k
        if not isinstance(v, str) or not v.strip():
            raise GridError(f"{where}: {what[:-1]} {k!r} is empty or not text: {v!r}")
        if "__" in str(k):
            raise GridError(f"{where}: key {k!r} may not contain '__' (cell keys are persona__task)")
        out[str(k)] = v.strip()
    return out


def grid_from_mapping(data: Any, name: str, where: str = "grid") -> Grid:
    """Validate a grid mapping (from a file or a Hydra config) and build a Grid."""
    if not isinstance(data, Mapping):
        raise GridError(f"{where}: a grid must be a mapping with baseline, personas, tasks; got {type(data).__name__}")
    base = data.get("baseline")
    if not isinstance(base, Mapping) or not base.get("persona") or not base.get("task"):
        raise GridError(f"{where}: missing 'baseline' with non-empty 'persona' and 'task' (got {base!r})")
    personas = _text_map(data.get("personas"), "personas", where)
    tasks = _text_map(data.get("tasks"), "tasks", where)
    for what, items, baseline in (("persona", personas, base["persona"]), ("task", tasks, base["task"])):
        same = [k for k, v in items.items() if v == str(baseline).strip()]
        if same:
            raise GridError(
                f"{where}: {what} {same[0]!r} has the baseline {what}'s text {str(baseline).strip()!r}, so its "
                f"delta is zero by construction; give it a different text or drop it"
            )
    markers: dict[str, list[str]] = {}
    raw = data.get("markers") or {}
    if not isinstance(raw, Mapping):
        raise GridError(f"{where}: 'markers' must map persona keys to lists of strings")
    for k, ms in raw.items():
        if k not in personas:
            continue  # the paper's marker table covers personas of other grids too
        if not isinstance(ms, list) or not ms:
            raise GridError(f"{where}: markers of {k!r} must be a non-empty list, got {ms!r}")
        for m in ms:
            if not isinstance(m, str) or not m.strip():
                raise GridError(f"{where}: persona {k!r} has an empty marker {m!r}; markers must be non-empty strings")
        markers[str(k)] = [str(m) for m in ms]
    return Grid(
        name=name,
        baseline_persona=str(base["persona"]).strip(),
        baseline_task=str(base["task"]).strip(),
        personas=personas,
        tasks=tasks,
        markers=markers,
    )


def load_grid(path: str | Path, name: str | None = None) -> Grid:
    data = load_yaml(path)
    return grid_from_mapping(data, name or Path(path).stem, where=f"grid file {str(path)!r}")
