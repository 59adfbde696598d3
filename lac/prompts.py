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
LY = "LY"  # length-matched baseline: XY with X's span tokens replaced (METHOD.md, "Spans ...")
DEFAULT_FILLER = " who thinks things over calmly and plainly"


@dataclass(frozen=True)
class Prompt:
    """Token ids of one rendered prompt and its user-turn end (site p_user_last).

    span: token positions [start, end) of the persona text in `ids` (None: no persona, or
    not computed). A token straddling the persona's first or last character belongs to it.
    """

    ids: tuple[int, ...]
    p_user_last: int
    span: tuple[int, int] | None = None

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


def encode(tokenizer: PreTrainedTokenizerBase, message: str, persona: str | None = None) -> Prompt:
    """Render one user turn with the model's template; BOS comes from the template itself.

    Defence in depth behind check_grid_text: the ids must hold exactly the template's own
    special tokens (as rendered for a neutral placeholder), else the message injected some.
    With `persona` (its text, which the message holds) the prompt carries the persona's
    token span (see persona_span); ids and p_user_last are the same either way.
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
    if persona is None:
        return Prompt(tuple(ids), n_head - 1)
    return Prompt(tuple(ids), n_head - 1, persona_span(tokenizer, message, persona, ids, n_head - 1))


def _tok_name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _persona_offset(message: str, persona: str) -> int:
    """Character offset of the persona in the message: where user_message puts it, else its first occurrence."""
    pre = user_message("\0", "").split("\0")[0]  # "As "
    if message.startswith(pre + persona):
        return len(pre)
    return message.find(persona)


def persona_span(
    tokenizer: PreTrainedTokenizerBase, message: str, persona: str, ids, p_user_last: int
) -> tuple[int, int]:
    """Token positions [start, end) of `persona` inside the rendered `message` (ids as encode gives).

    The message is located in the text the chat template renders (its last occurrence inside the
    user turn); the persona's character range maps to tokens through the fast tokenizer's offset
    mapping. Every token overlapping that range is in the span, so a token merging the persona's
    first letters with the preceding space (" Marx") or its last ones with what follows belongs to it.
    """
    where = f"persona {persona!r} (tokenizer {_tok_name(tokenizer)})"
    if not persona:
        raise PromptError(f"empty persona text has no span; {where}")
    p0 = _persona_offset(message, persona)
    if p0 < 0:
        raise PromptError(f"{where} does not occur in its message {message!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise PromptError(f"persona spans need a fast tokenizer (offset mapping); {where} is slow")
    chat = [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    head = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    m0 = head.rfind(message) if text.startswith(head) else text.rfind(message)
    if m0 < 0:
        raise PromptError(
            f"the chat template of tokenizer {_tok_name(tokenizer)} does not render the user message "
            f"verbatim (it rewrote {message!r}), so the text of persona {persona!r} cannot be located "
            "in the prompt; persona spans (and the length-matched baseline) need a template that "
            "copies the user content unchanged"
        )
    c0, c1 = m0 + p0, m0 + p0 + len(persona)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise PromptError(f"re-tokenizing the prompt gave other ids; {where}")
    hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < c1 and b > c0]
    if not hit or hit[-1] - hit[0] + 1 != len(hit) or hit[-1] > p_user_last:
        raise PromptError(f"{where}: no contiguous token span inside the user turn (tokens {hit})")
    return hit[0], hit[-1] + 1


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


def role_persona(grid: Grid, cell: Cell, role: str) -> str | None:
    """Persona text of a role's prompt: X's for XY, XB (and LY's host XY), the baseline's for BY, BB; bare: None."""
    if role == "bare":
        return None
    return grid.personas[cell.persona] if role[0] in ("X", "L") else grid.baseline_persona


def role_text(grid: Grid, cell: Cell, role: str) -> str:
    """User message of one of a cell's four prompts (BB, XB, BY, XY) or "bare"."""
    persona = grid.personas[cell.persona] if role[0] == "X" else grid.baseline_persona
    task = grid.tasks[cell.task] if role[-1] == "Y" else grid.baseline_task
    if role == "bare":
        return user_message(None, grid.tasks[cell.task])
    return user_message(persona, task)


class PromptBook:
    """Encodes each distinct message once; BB is shared by every cell, XB by a persona's tasks.

    Every prompt carries its persona span (None for "bare"). Role "LY" is the length-matched
    baseline of METHOD.md: XY's ids with X's span replaced, token for token, by the first |S_X|
    tokens of the baseline persona's span (from BY) followed, when X's span is longer, by the
    tokens of `filler` (tokenized once without special tokens, repeated cyclically). It has
    XY's length, p_user_last and span; ly_text(cell) is the decoded replacement.
    """

    def __init__(self, tokenizer, grid: Grid, filler: str = DEFAULT_FILLER):
        self.tokenizer = tokenizer
        self.grid = grid
        self.filler = filler
        self._cache: dict[tuple[str, str | None], Prompt] = {}
        self._ly: dict[Cell, tuple[Prompt, tuple[int, ...]]] = {}
        self._filler_ids: tuple[int, ...] | None = None

    def get(self, cell: Cell, role: str) -> Prompt:
        if role == LY:
            return self._length_matched(cell)[0]
        msg = role_text(self.grid, cell, role)
        key = (msg, role_persona(self.grid, cell, role))
        if key not in self._cache:
            self._cache[key] = encode(self.tokenizer, msg, key[1])
        return self._cache[key]

    def ly_text(self, cell: Cell) -> str:
        """Decoded text that replaces X's persona in the cell's LY prompt (to record with results)."""
        return self.tokenizer.decode(list(self._length_matched(cell)[1]))

    def _filler_tokens(self) -> tuple[int, ...]:
        if self._filler_ids is None:
            hits = _found(self.filler, _special_texts(self.tokenizer))
            if hits:
                raise PromptError(f"LY filler {self.filler!r} contains special-token text {hits}; {PLAIN_TEXT}")
            ids = self.tokenizer(self.filler, add_special_tokens=False)["input_ids"]
            self._filler_ids = tuple(int(i) for i in ids)
        return self._filler_ids

    def _length_matched(self, cell: Cell) -> tuple[Prompt, tuple[int, ...]]:
        if cell in self._ly:
            return self._ly[cell]
        xy, by = self.get(cell, "XY"), self.get(cell, "BY")
        if xy.span is None or by.span is None:
            raise PromptError(f"cell {cell.key!r}: XY or BY prompt has no persona span; no LY prompt")
        (s, e), (bs, be) = xy.span, by.span
        n = e - s
        if n < 1:
            raise PromptError(f"persona {self.grid.personas[cell.persona]!r} has an empty token span; no LY prompt")
        repl = list(by.ids[bs:be][:n])
        if len(repl) < n:
            fill = self._filler_tokens()
            if not fill:
                raise PromptError(
                    f"LY filler {self.filler!r} tokenizes to no tokens, but persona "
                    f"{self.grid.personas[cell.persona]!r} ({n} tokens) is longer than the baseline "
                    f"persona {self.grid.baseline_persona!r} ({be - bs} tokens); give a non-empty filler text"
                )
            repl += [fill[i % len(fill)] for i in range(n - len(repl))]
        ly = Prompt(xy.ids[:s] + tuple(repl) + xy.ids[e:], xy.p_user_last, xy.span)
        self._ly[cell] = (ly, tuple(repl))
        return self._ly[cell]
