"""Chat-template prompts: "As {persona}, {task}" rendered with the model's own template."""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lac.errors import LacError
from lac.grid import Cell, Grid

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


class PromptError(LacError):
    """Grid text or a rendered prompt that would not be the plain user turn the paper measures."""


PLAIN_TEXT = (
    "grid text must be plain text: any words, punctuation, markup or unicode, "
    "but none of the model's special (chat-control) tokens"
)


def _special_texts(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """Every special token's text -> id: declared ones, added ones marked special, BOS/EOS/PAD.

    `all_special_tokens` alone misses some (Qwen's <|im_start|> is only an added special token).
    """
    out: dict[str, int | None] = {}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False) and str(tok):
            out[str(tok)] = int(i)
    names = list(getattr(tokenizer, "all_special_tokens", []))
    names += [getattr(tokenizer, a, None) for a in ("bos_token", "eos_token", "pad_token")]
    for t in names:
        if t and str(t) not in out:
            i = tokenizer.convert_tokens_to_ids(str(t))
            out[str(t)] = i if isinstance(i, int) else None
    return out


def _found(text: str, specials: Iterable[str]) -> list[str]:
    """Special-token texts occurring in `text`, in order of first occurrence."""
    hits = [t for t in specials if t in text]
    return sorted(hits, key=lambda t: (text.index(t), -len(t)))


def check_grid_text(tokenizer: PreTrainedTokenizerBase, grid: Grid, model: str) -> None:
    """Refuse grid text holding special-token text before any weights load.

    Grid text is data: a persona containing e.g. "<|im_end|>" would close the user turn and
    inject its own chat structure, so the prompt would not be the paper's "As X, Y" user turn.
    """
    specials = list(_special_texts(tokenizer))
    fields = [("baseline persona", grid.baseline_persona), ("baseline task", grid.baseline_task)]
    fields += [(f"persona {k!r}", v) for k, v in grid.personas.items()]
    fields += [(f"task {k!r}", v) for k, v in grid.tasks.items()]
    bad = [(name, hits) for name, text in fields if (hits := _found(text, specials))]
    if bad:
        lines = [f"  {name} contains {', '.join(repr(h) for h in hits)}" for name, hits in bad]
        raise PromptError(
            f"grid {grid.name!r} has special-token text of the tokenizer of model {model!r}:\n"
            + "\n".join(lines)
            + f"\n{PLAIN_TEXT}; remove or reword these."
        )


def _render(tokenizer: PreTrainedTokenizerBase, message: str) -> tuple[list[int], int]:
    """Ids of the user turn + generation prompt, and the token count of the user turn alone."""
    chat = [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    head = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    return ids, n_head


_TEMPLATE_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLACEHOLDER = "x"


def _template_specials(tokenizer: PreTrainedTokenizerBase) -> tuple[frozenset[int], Counter]:
    """Special ids of the tokenizer and the multiset the template itself emits, cached.

    The cache entry is re-made when the template or vocabulary changes, so a tokenizer
    edited after first use is never checked against a stale template.
    """
    stamp = (str(getattr(tokenizer, "chat_template", "")), len(tokenizer))
    entry = _TEMPLATE_SPECIALS.get(tokenizer)
    if entry is None or entry[0] != stamp:
        ids = frozenset(i for i in _special_texts(tokenizer).values() if i is not None)
        ref = Counter(i for i in _render(tokenizer, _PLACEHOLDER)[0] if i in ids)
        entry = (stamp, ids, ref)
        _TEMPLATE_SPECIALS[tokenizer] = entry
    return entry[1], entry[2]


def encode(tokenizer: PreTrainedTokenizerBase, message: str) -> Prompt:
    """Render one user turn with the model's template; BOS comes from the template itself.

    Defence in depth behind check_grid_text: the ids must hold exactly the template's own
    special tokens (as rendered for a neutral placeholder), else the message injected some.
    """
    ids, n_head = _render(tokenizer, message)
    if not ids or n_head < 1 or n_head > len(ids):
        raise ValueError(f"chat template gave an unusable prompt for {message!r}")
    special_ids, expected = _template_specials(tokenizer)
    got = Counter(i for i in ids if i in special_ids)
    if got != expected:
        extra, missing = got - expected, expected - got

        def names(c: Counter) -> str:
            return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} x{n}" for i, n in sorted(c.items())) or "none"

        raise PromptError(
            f"message {message!r} changes the chat template's special tokens "
            f"(extra: {names(extra)}; missing: {names(missing)}) for tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r}; {PLAIN_TEXT}."
        )
    return Prompt(tuple(ids), n_head - 1)


def check_prompt_lengths(
    prompts: Iterable[tuple[str, Prompt]], max_positions: int, extra: int, model: str
) -> None:
    """Refuse prompts that with `extra` reference tokens exceed the model's context.

    Positions past max_position_embeddings are silently garbage (or an index error) in the
    forward pass, so a too-long persona or task must stop the run up front.
    """
    over = [(label, len(p.ids)) for label, p in prompts if len(p.ids) + extra > max_positions]
    if over:
        shown = [
            f"  prompt {label}: {n} tokens + {extra} reference tokens = {n + extra}"
            for label, n in over[:5]
        ]
        more = f"\n  ... and {len(over) - 5} more" if len(over) > 5 else ""
        raise PromptError(
            f"{len(over)} prompt(s) exceed the context of model {model!r}, {max_positions} positions:\n"
            + "\n".join(shown)
            + more
            + "\nshorten the persona or task text."
        )


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
