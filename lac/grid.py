"""Prompt grids: the whole design of a study, as data.

The paper's grids (`lac/data/paper-grids.yaml`) give a baseline (B), personas (X)
and tasks (Y), rendered as the user turn "As {persona}, {task}":

    baseline: {persona: ..., task: ...}
    personas: {key: text, ...}
    tasks: {key: text, ...}
    markers: {persona_key: [marker, ...], ...}   # optional

A design grid (METHOD.md, "Designs beyond") gives the chat messages with named
slots and k >= 2 factors, each with a baseline and levels; cells are the full
factorial of levels unless listed:

    messages: [{role: system, content: "You are {persona}."}, {role: user, content: "{task}"}]
    factors:
      persona: {letter: X, baseline: ..., levels: {key: text, ...}}
      task: {letter: Y, baseline: ..., levels: {...}}
    cells: [[persona_key, task_key], ...]        # optional
"""

from __future__ import annotations

import hashlib
import itertools
import json
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lac.errors import LacError

DATA_DIR = Path(__file__).parent / "data"


class GridError(LacError):
    """A grid file or grid config that lac cannot use."""


PAPER_MESSAGES: tuple[tuple[str, str], ...] = (("user", "As {persona}, {task}"),)
RESERVED_LETTERS = {"B": "baseline", "L": "length-matched", "S": "swap partner"}
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Factor:
    """One factor of the design: the slot it fills in the messages, its baseline text and levels."""

    name: str
    letter: str  # its letter in role names (persona X, task Y): role "XB" = persona on, task at baseline
    baseline: str
    levels: dict[str, str]


@dataclass(frozen=True, init=False)
class Cell:
    """One non-baseline level per factor; Cell("buffett", "haiku") is a cell of the paper's 2x2."""

    keys: tuple[str, ...]
    factors: tuple[str, ...]

    def __init__(self, *keys: str, factors: tuple[str, ...] = ("persona", "task")):
        if len(keys) != len(factors):
            raise ValueError(f"cell {keys} needs one level per factor {factors}")
        object.__setattr__(self, "keys", tuple(keys))
        object.__setattr__(self, "factors", tuple(factors))

    @property
    def key(self) -> str:
        return "__".join(self.keys)

    def level(self, factor: str) -> str:
        """The cell's level key of `factor` ("" when the design has no such factor)."""
        return self.keys[self.factors.index(factor)] if factor in self.factors else ""

    @property
    def persona(self) -> str:
        return self.level("persona")

    @property
    def task(self) -> str:
        return self.level("task")


@dataclass(frozen=True)
class Grid:
    """A design: chat messages with named slots, the factors filling them, the cells.

    Roles name a subset of factors by one letter per factor, the factor's letter when it takes
    the cell's level and B when it stays at baseline (paper: BB, XB, BY, XY); L marks the
    length-matched baseline of a factor, S its swap partner's level.
    """

    name: str
    factors: tuple[Factor, ...]
    messages: tuple[tuple[str, str], ...] = PAPER_MESSAGES  # (chat role, content with {slots})
    explicit_cells: tuple[tuple[str, ...], ...] | None = None
    markers: dict[str, list[str]] = field(default_factory=dict)
    partners: dict[str, dict[str, str]] = field(default_factory=dict)  # factor -> level -> swap partner level

    # -- the paper's 2x2 vocabulary
    @property
    def paper_design(self) -> bool:
        return [f.name for f in self.factors] == ["persona", "task"] and self.messages == PAPER_MESSAGES

    def factor(self, name: str) -> Factor:
        for f in self.factors:
            if f.name == name:
                return f
        raise GridError(f"grid {self.name!r} has no factor {name!r}; its factors: {', '.join(self.factor_names)}")

    @property
    def factor_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.factors)

    @property
    def personas(self) -> dict[str, str]:
        return self.factor("persona").levels

    @property
    def tasks(self) -> dict[str, str]:
        return self.factor("task").levels

    @property
    def baseline_persona(self) -> str:
        return self.factor("persona").baseline

    @property
    def baseline_task(self) -> str:
        return self.factor("task").baseline

    def cells(self) -> list[Cell]:
        names = self.factor_names
        if self.explicit_cells is not None:
            return [Cell(*keys, factors=names) for keys in self.explicit_cells]
        return [Cell(*keys, factors=names) for keys in itertools.product(*(f.levels for f in self.factors))]

    # -- roles: subsets of factors
    def role(self, on: Iterable[str] = (), *, mark: dict[str, str] | None = None) -> str:
        """Role name of the prompt with factors `on` at the cell's level, the rest at baseline;
        `mark` puts another letter (L, S) at a factor."""
        on, mark = set(on), mark or {}
        return "".join(mark.get(f.name) or (f.letter if f.name in on else "B") for f in self.factors)

    @property
    def full(self) -> str:
        """P_all (paper: XY): every factor at the cell's level; the reference comes from it."""
        return self.role(self.factor_names)

    @property
    def empty(self) -> str:
        """P_{} (paper: BB)."""
        return self.role()

    def host(self, factor: str) -> str:
        """P_all with `factor` at baseline (paper: BY for persona)."""
        return self.role(set(self.factor_names) - {factor})

    def subsets(self) -> list[tuple[str, ...]]:
        """Every subset of factors, by size then factor order (paper: {}, {X}, {Y}, {X,Y})."""
        names = self.factor_names
        return [s for k in range(len(names) + 1) for s in itertools.combinations(names, k)]

    def roles(self) -> list[str]:
        return [self.role(s) for s in self.subsets()]

    def content_hash(self) -> str:
        """Identity of the design's text, so caches keyed on it survive renames."""
        if self.paper_design and self.explicit_cells is None and not self.partners:
            p, t = self.factors
            parts: Any = [p.baseline, t.baseline, p.levels, t.levels]  # as before designs: caches stay valid
        else:
            parts = [self.messages, [(f.name, f.letter, f.baseline, f.levels) for f in self.factors],
                     self.explicit_cells, self.partners]
        blob = json.dumps(parts, sort_keys=True)
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
    seen: dict[str, str] = {}
    for k, v in out.items():
        if v in seen:  # a copy-paste slip: one level counted twice in every median
            raise GridError(f"{where}: {what} {seen[v]!r} and {k!r} have the same text {v!r}; each must differ")
        seen[v] = k
    return out


def _messages(data: Any, where: str) -> tuple[tuple[str, str], ...]:
    if data is None:
        return PAPER_MESSAGES
    if not isinstance(data, (list, tuple)) or not data:
        raise GridError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {data!r}")
    out = []
    for i, m in enumerate(data):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise GridError(f"{where}: message {i} must be a mapping with exactly 'role' and 'content', got {m!r}")
        if m["role"] not in MESSAGE_ROLES:
            raise GridError(f"{where}: message {i} has role {m['role']!r}; allowed: {', '.join(MESSAGE_ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise GridError(f"{where}: message {i} has empty or non-text content {m['content']!r}")
        out.append((str(m["role"]), str(m["content"])))
    if out[-1][0] != "user":
        raise GridError(f"{where}: the last message must be the user turn (the model answers it), got {out[-1][0]!r}")
    return tuple(out)


def template_slots(messages: Iterable[tuple[str, str]], where: str = "grid") -> list[str]:
    """The {slot} names of the messages, in order; each plain (no !conversion or :format), once."""
    slots: list[str] = []
    for i, (_, content) in enumerate(messages):
        try:
            parsed = list(string.Formatter().parse(content))
        except ValueError as e:
            raise GridError(f"{where}: message {i} {content!r} is not a valid template ({e}); "
                            "write a literal brace as {{ or }}") from None
        for _, name, spec, conv in parsed:
            if name is None:
                continue
            if not name.isidentifier() or spec or conv:
                raise GridError(f"{where}: message {i} has slot {{{name}{'!' + conv if conv else ''}"
                                f"{':' + spec if spec else ''}}}; slots are plain names like {{persona}}")
            if name in slots:
                raise GridError(f"{where}: slot {{{name}}} appears twice in the messages; each slot at most once")
            slots.append(name)
    return slots


def _factors(data: Any, where: str) -> tuple[Factor, ...]:
    """`factors:` of a design grid, or the paper's baseline/personas/tasks as factors persona (X), task (Y)."""
    if data.get("factors") is None:
        base = data.get("baseline")
        if not isinstance(base, Mapping) or not base.get("persona") or not base.get("task"):
            raise GridError(f"{where}: missing 'baseline' with non-empty 'persona' and 'task' (got {base!r}), "
                            "or a 'factors:' section")
        raw = {"persona": {"letter": "X", "baseline": base["persona"], "levels": data.get("personas")},
               "task": {"letter": "Y", "baseline": base["task"], "levels": data.get("tasks")}}
        plural = {"persona": "personas", "task": "tasks"}
    else:
        clash = [k for k in ("baseline", "personas", "tasks") if k in data]
        if clash:
            raise GridError(f"{where}: give either 'factors:' or the paper's baseline/personas/tasks, not both "
                            f"(found {', '.join(clash)} beside factors)")
        raw = data["factors"]
        if not isinstance(raw, Mapping) or len(raw) < 2:
            raise GridError(f"{where}: 'factors' must map at least two factor names to "
                            f"{{baseline, levels}}, got {raw!r}")
        plural = {}
    out, letters = [], {}
    for name, spec in raw.items():
        name = str(name)
        if not name.isidentifier():
            raise GridError(f"{where}: factor name {name!r} must be a plain name (it is a {{slot}} in the messages)")
        if not isinstance(spec, Mapping):
            raise GridError(f"{where}: factor {name!r} must be a mapping with baseline and levels, got {spec!r}")
        unknown = set(spec) - {"letter", "baseline", "levels"}
        if unknown:
            raise GridError(f"{where}: factor {name!r} has unknown keys {sorted(unknown)}; allowed: letter, baseline, levels")
        base = spec.get("baseline")
        if not isinstance(base, str) or not base.strip():
            raise GridError(f"{where}: factor {name!r} has no baseline text (got {base!r}); every factor needs "
                            "a baseline level (the B of role names)")
        levels = _text_map(spec.get("levels"), plural.get(name, f"factors.{name}.levels"), where)
        same = [k for k, v in levels.items() if v == base.strip()]
        if same:
            what = name if plural else f"level of factor {name!r}"
            raise GridError(
                f"{where}: {what} {same[0]!r} has the baseline {name}'s text {base.strip()!r}, so its "
                f"delta is zero by construction; give it a different text or drop it"
            )
        letter = str(spec.get("letter") or {"persona": "X", "task": "Y"}.get(name, name[0].upper()))
        if len(letter) != 1 or not ("A" <= letter <= "Z") or letter in RESERVED_LETTERS:
            raise GridError(f"{where}: factor {name!r} has letter {letter!r}; allowed: one capital A-Z except "
                            + ", ".join(f"{k} ({v})" for k, v in RESERVED_LETTERS.items()))
        if letter in letters:
            raise GridError(f"{where}: factors {letters[letter]!r} and {name!r} share the letter {letter!r}; "
                            f"give one of them another letter: (letter: Q)")
        letters[letter] = name
        out.append(Factor(name, letter, base.strip(), levels))
    return tuple(out)


def _cells(data: Any, factors: tuple[Factor, ...], where: str) -> tuple[tuple[str, ...], ...] | None:
    raw = data.get("cells")
    if raw is None:
        return None
    names = [f.name for f in factors]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise GridError(f"{where}: 'cells' must be a non-empty list of [{', '.join(names)}] level keys")
    out: list[tuple[str, ...]] = []
    for c in raw:
        if not isinstance(c, (list, tuple)) or len(c) != len(factors):
            raise GridError(f"{where}: cell {c!r} must list one level per factor [{', '.join(names)}]")
        for f, k in zip(factors, c, strict=True):
            if str(k) not in f.levels:
                raise GridError(f"{where}: cell {list(c)} has level {k!r} for factor {f.name!r}; "
                                f"allowed: {', '.join(f.levels)}")
        keys = tuple(str(k) for k in c)
        if keys in out:
            raise GridError(f"{where}: cell {list(c)} is listed twice")
        out.append(keys)
    return tuple(out)


def grid_from_mapping(data: Any, name: str, where: str = "grid") -> Grid:
    """Validate a grid mapping (from a file or a Hydra config) and build a Grid."""
    if not isinstance(data, Mapping):
        raise GridError(f"{where}: a grid must be a mapping with baseline, personas, tasks (or messages and "
                        f"factors); got {type(data).__name__}")
    known = {"name", "path", "messages", "factors", "cells", "markers", "baseline", "personas", "tasks"}
    unknown = set(data) - known
    if unknown:
        raise GridError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(known))}")
    factors = _factors(data, where)
    messages = _messages(data.get("messages"), where)
    slots = template_slots(messages, where)
    names = [f.name for f in factors]
    for s in slots:
        if s not in names:
            raise GridError(f"{where}: slot {{{s}}} in the messages is filled by no factor; factors: {', '.join(names)}")
    for f in names:
        if f not in slots:
            raise GridError(f"{where}: factor {f!r} is used by no message; put {{{f}}} in a message's content "
                            f"(slots now: {', '.join(slots) or 'none'})")
    markers: dict[str, list[str]] = {}
    raw = data.get("markers") or {}
    if not isinstance(raw, Mapping):
        raise GridError(f"{where}: 'markers' must map persona keys to lists of strings")
    if raw and "persona" not in names:
        raise GridError(f"{where}: markers are keyed by persona, and this design has no factor 'persona'")
    personas = factors[names.index("persona")].levels if "persona" in names else {}
    for k, ms in raw.items():
        if k not in personas:
            continue  # the paper's marker table covers personas of other grids too
        if not isinstance(ms, list) or not ms:
            raise GridError(f"{where}: markers of {k!r} must be a non-empty list, got {ms!r}")
        seen: dict[str, str] = {}
        for m in ms:
            if not isinstance(m, str) or not m.strip():
                raise GridError(f"{where}: persona {k!r} has an empty marker {m!r}; markers must be non-empty strings")
            if m.lower() in seen and seen[m.lower()] != m:  # scoring ignores case: one marker counted twice
                raise GridError(f"{where}: persona {k!r} has markers {seen[m.lower()]!r} and {m!r}, one marker to "
                                f"scoring (it ignores case), which would count it twice in marker_distinct: keep one")
            seen.setdefault(m.lower(), m)
        markers[str(k)] = [str(m) for m in ms]
    return Grid(name=name, factors=factors, messages=messages, explicit_cells=_cells(data, factors, where),
                markers=markers)


def paper_grid(name: str, baseline_persona: str, baseline_task: str, personas: dict[str, str],
               tasks: dict[str, str], markers: dict[str, list[str]] | None = None) -> Grid:
    """A grid of the paper's 2x2 design ("As {persona}, {task}") from its texts, unvalidated."""
    return Grid(name, (Factor("persona", "X", baseline_persona, dict(personas)),
                       Factor("task", "Y", baseline_task, dict(tasks))), markers=dict(markers or {}))


def edit_paper_grid(grid: Grid, **change: Any) -> Grid:
    """The paper-design `grid` with some of baseline_persona, baseline_task, personas, tasks replaced."""
    now = {"baseline_persona": grid.baseline_persona, "baseline_task": grid.baseline_task,
           "personas": grid.personas, "tasks": grid.tasks, "markers": grid.markers}
    return paper_grid(grid.name, **{**now, **change})


def with_partners(grid: Grid, factor: str, rule: Any) -> Grid:
    """The grid with swap partners for `factor`: "next" (the next level in grid order, cyclic),
    "same" (X' = X), or a mapping level -> partner level."""
    f = grid.factor(factor)
    keys = list(f.levels)
    if rule == "next":
        if len(keys) < 2:  # next of the only level is itself: a swap that writes the clean run back
            raise GridError(f"swap partner rule next needs two or more {factor} levels; grid {grid.name!r} has "
                            f"{', '.join(keys)} only (partner=same, if X' = X is what you want)")
        pairs = {k: keys[(i + 1) % len(keys)] for i, k in enumerate(keys)}
    elif rule == "same":
        pairs = {k: k for k in keys}
    elif isinstance(rule, Mapping):
        pairs = {str(k): str(v) for k, v in rule.items()}
        for k, v in pairs.items():
            for what, level in (("level", k), ("partner", v)):
                if level not in f.levels:
                    raise GridError(f"swap partner rule: {what} {level!r} is no {factor} of grid {grid.name!r}; "
                                    f"allowed: {', '.join(keys)}")
        missing = [k for k in {c.level(factor) for c in grid.cells()} if k not in pairs]
        if missing:
            raise GridError(f"swap partner rule names no partner for {factor} {sorted(missing)} of grid {grid.name!r}")
    else:
        raise GridError(f"swap partner rule {rule!r}; allowed: next, same, or a mapping {factor} -> partner {factor}")
    return replace(grid, partners={**grid.partners, factor: pairs})


def load_grid(path: str | Path, name: str | None = None) -> Grid:
    data = load_yaml(path)
    return grid_from_mapping(data, name or Path(path).stem, where=f"grid file {str(path)!r}")
