"""Chat-template prompts: "As {persona}, {task}" rendered with the model's own template."""

from __future__ import annotations

from dataclasses import dataclass

from lac.grid import Cell, Grid

ROLES = ("BB", "XB", "BY", "XY")  # the 2x2 of a cell: (persona, task) each baseline or not


@dataclass(frozen=True)
class Prompt:
    """Token ids of one rendered prompt and its user-turn end (site p_user_last)."""

    ids: tuple[int, ...]
    p_user_last: int

    @property
    def p_last(self) -> int:
        return len(self.ids) - 1


def user_message(persona: str | None, task: str) -> str:
    """The paper's role prompt; persona None gives the "bare" task-only prompt."""
    return task if persona is None else f"As {persona}, {task}"


def encode(tokenizer, message: str) -> Prompt:
    """Render one user turn with the model's template; BOS comes from the template itself."""
    chat = [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    head = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    if not ids or n_head < 1 or n_head > len(ids):
        raise ValueError(f"chat template gave an unusable prompt for {message!r}")
    return Prompt(tuple(ids), n_head - 1)


def role_text(grid: Grid, cell: Cell, role: str) -> str:
    """User message of one of a cell's four prompts (BB, XB, BY, XY) or "bare"."""
    persona = grid.personas[cell.persona] if role[0] == "X" else grid.baseline_persona
    task = grid.tasks[cell.task] if role[-1] == "Y" else grid.baseline_task
    if role == "bare":
        return user_message(None, grid.tasks[cell.task])
    return user_message(persona, task)


class PromptBook:
    """Encodes each distinct message once; BB is shared by every cell, XB by a persona's tasks."""

    def __init__(self, tokenizer, grid: Grid):
        self.tokenizer = tokenizer
        self.grid = grid
        self._cache: dict[str, Prompt] = {}

    def get(self, cell: Cell, role: str) -> Prompt:
        msg = role_text(self.grid, cell, role)
        if msg not in self._cache:
            self._cache[msg] = encode(self.tokenizer, msg)
        return self._cache[msg]
