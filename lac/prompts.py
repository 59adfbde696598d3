"""Chat-template prompts: a grid's messages ("As {persona}, {task}" by default) rendered with
the model's own template, with the token span of every slot."""

from __future__ import annotations

import string
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
    spans: (slot, start, end) of every slot of the grid's messages.
    """

    ids: tuple[int, ...]
    p_user_last: int
    span: tuple[int, int] | None = None
    spans: tuple[tuple[str, int, int], ...] = ()

    @property
    def p_last(self) -> int:
        return len(self.ids) - 1

    def slot_span(self, slot: str) -> tuple[int, int] | None:
        found = next(((s, e) for name, s, e in self.spans if name == slot), None)
        return self.span if found is None and slot == "persona" else found  # a prompt made with a span only


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
    fields = [(f"baseline {f.name}", f.baseline) for f in grid.factors]
    fields += [(f"{f.name} {k!r}", v) for f in grid.factors for k, v in f.levels.items()]
    fields += [(f"message {i} template", c) for i, (_, c) in enumerate(grid.messages)]
    bad = [(name, hits) for name, text in fields if (hits := _found(text, specials))]
    if bad:
        lines = [f"  {name} contains {', '.join(repr(h) for h in hits)}" for name, hits in bad]
        raise PromptError(
            f"grid {grid.name!r} has special-token text of the tokenizer of model {model!r}:\n"
            + "\n".join(lines)
            + f"\n{PLAIN_TEXT}; remove or reword these."
        )


Messages = tuple[tuple[str, str], ...]  # (chat role, content)
Slots = dict[str, tuple[int, int, int]]  # slot -> (message index, first char, end char) in its content


def fill(template: Messages, values: dict[str, str]) -> tuple[Messages, Slots]:
    """The template's messages with its {slots} filled, and where each slot's text landed."""
    out, slots = [], {}
    for i, (role, tpl) in enumerate(template):
        text = ""
        for literal, name, _, _ in string.Formatter().parse(tpl):
            text += literal
            if name is not None:
                slots[name] = (i, len(text), len(text) + len(values[name]))
                text += values[name]
        out.append((role, text))
    return tuple(out), slots


def _chat_text(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation: bool) -> str:
    chat = [{"role": r, "content": c} for r, c in messages]
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"tokenizer {_tok_name(tokenizer)} has no chat template; lac renders every prompt in "
                          "the model's chat template: give an instruction-tuned model's folder, or set "
                          "tokenizer.chat_template and save it there (chat_template.jinja)")
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # jinja's raise_exception: e.g. Gemma-2's "System role not supported"
        roles = [r for r, _ in messages]
        raise PromptError(
            f"the chat template of tokenizer {_tok_name(tokenizer)} refuses messages with roles {roles}: {e}. "
            + ("This model's template has no system role; use a grid that puts every slot in the user turn "
               "(e.g. the paper's 'As {persona}, {task}')." if "system" in roles else "")
        ) from None


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages | str) -> tuple[list[int], int]:
    """Ids of the chat + generation prompt, and the token count of the chat alone (up to the user turn's end)."""
    if isinstance(messages, str):
        messages = (("user", messages),)
    text, head = _chat_text(tokenizer, messages, True), _chat_text(tokenizer, messages, False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    return ids, n_head


_TEMPLATE_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLACEHOLDER = "x"


def _template_specials(tokenizer: PreTrainedTokenizerBase, roles: tuple[str, ...] = ("user",)) -> tuple[frozenset[int], Counter]:
    """Special ids of the tokenizer and the multiset the template itself emits for chats with
    these message roles, cached.

    The cache entry is re-made when the template or vocabulary changes, so a tokenizer
    edited after first use is never checked against a stale template.
    """
    stamp = (str(getattr(tokenizer, "chat_template", "")), len(tokenizer))
    entry = _TEMPLATE_SPECIALS.get(tokenizer)
    if entry is None or entry[0] != stamp:
        ids = frozenset(i for i in _special_texts(tokenizer).values() if i is not None)
        entry = (stamp, ids, {})
        _TEMPLATE_SPECIALS[tokenizer] = entry
    if roles not in entry[2]:
        placeholder = tuple((r, _PLACEHOLDER) for r in roles)
        entry[2][roles] = Counter(i for i in _render(tokenizer, placeholder)[0] if i in entry[1])
    return entry[1], entry[2][roles]


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, slots: Slots | None = None) -> Prompt:
    """Render a chat with the model's template; BOS comes from the template itself.

    Defence in depth behind check_grid_text: the ids must hold exactly the template's own
    special tokens (as rendered for neutral placeholders), else the messages injected some.
    With `slots` the prompt carries each slot's token span (persona's as `span`); ids and
    p_user_last are the same either way.
    """
    ids, n_head = _render(tokenizer, messages)
    if not ids or n_head < 1 or n_head > len(ids):
        raise ValueError(f"chat template gave an unusable prompt for {messages!r}")
    special_ids, expected = _template_specials(tokenizer, tuple(r for r, _ in messages))
    got = Counter(i for i in ids if i in special_ids)
    if got != expected:
        extra, missing = got - expected, expected - got

        def names(c: Counter) -> str:
            return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} x{n}" for i, n in sorted(c.items())) or "none"

        shown = messages[0][1] if len(messages) == 1 else [c for _, c in messages]
        raise PromptError(
            f"message {shown!r} changes the chat template's special tokens "
            f"(extra: {names(extra)}; missing: {names(missing)}) for tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r}; {PLAIN_TEXT}."
        )
    if not slots:
        return Prompt(tuple(ids), n_head - 1)
    spans = slot_spans(tokenizer, messages, slots, ids, n_head - 1)
    return Prompt(tuple(ids), n_head - 1, spans.get("persona"), tuple((k, *v) for k, v in spans.items()))


def encode(tokenizer: PreTrainedTokenizerBase, message: str, persona: str | None = None) -> Prompt:
    """One user turn (the paper's prompt); with `persona` (its text, which the message holds) the
    prompt carries the persona's token span."""
    if persona is None:
        return encode_chat(tokenizer, (("user", message),))
    if not persona:
        raise PromptError(f"empty persona text has no span; persona {persona!r} (tokenizer {_tok_name(tokenizer)})")
    p0 = _persona_offset(message, persona)
    if p0 < 0:
        raise PromptError(f"persona {persona!r} (tokenizer {_tok_name(tokenizer)}) does not occur in its message {message!r}")
    return encode_chat(tokenizer, (("user", message),), {"persona": (0, p0, p0 + len(persona))})


def _tok_name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _persona_offset(message: str, persona: str) -> int:
    """Character offset of the persona in the message: where user_message puts it, else its first occurrence."""
    pre = user_message("\0", "").split("\0")[0]  # "As "
    if message.startswith(pre + persona):
        return len(pre)
    return message.find(persona)


def slot_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, slots: Slots, ids, p_user_last: int
) -> dict[str, tuple[int, int]]:
    """Token positions [start, end) of each slot's text inside the rendered chat (ids as encode gives).

    Each message is located in the text the chat template renders (the last one first, each
    before the next); a slot's character range maps to tokens through the fast tokenizer's
    offset mapping. Every token overlapping that range is in the span, so a token merging the
    slot's first letters with the preceding space (" Marx") or its last ones with what follows
    belongs to it.
    """
    first = next(iter(slots))
    i0, a0, b0 = slots[first]
    where = f"{first} {messages[i0][1][a0:b0]!r} (tokenizer {_tok_name(tokenizer)})"
    if not getattr(tokenizer, "is_fast", False):
        raise PromptError(f"slot spans need a fast tokenizer (offset mapping); {where} is slow")
    text, head = _chat_text(tokenizer, messages, True), _chat_text(tokenizer, messages, False)
    base = head if text.startswith(head) else text
    starts, limit = [0] * len(messages), len(base)
    for i in reversed(range(len(messages))):
        m0 = base.rfind(messages[i][1], 0, limit)
        if m0 < 0:
            raise PromptError(
                f"the chat template of tokenizer {_tok_name(tokenizer)} does not render the "
                f"{messages[i][0]} message verbatim (it rewrote {messages[i][1]!r}), so the text of {where} "
                "cannot be located in the prompt; slot spans (and the length-matched baseline) need a "
                "template that copies message content unchanged"
            )
        starts[i], limit = m0, m0
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise PromptError(f"re-tokenizing the prompt gave other ids; {where}")
    out = {}
    for name, (i, a, b) in slots.items():
        c0, c1 = starts[i] + a, starts[i] + b
        hit = [j for j, (x, y) in enumerate(enc["offset_mapping"]) if x < c1 and y > c0]
        if not hit or hit[-1] - hit[0] + 1 != len(hit) or hit[-1] > p_user_last:
            what = f"{name} {messages[i][1][a:b]!r} (tokenizer {_tok_name(tokenizer)})"
            raise PromptError(f"{what}: no contiguous token span inside the chat (tokens {hit})")
        out[name] = (hit[0], hit[-1] + 1)
    return out


def persona_span(
    tokenizer: PreTrainedTokenizerBase, message: str, persona: str, ids, p_user_last: int
) -> tuple[int, int]:
    """Token positions [start, end) of `persona` inside the rendered user `message`."""
    p0 = _persona_offset(message, persona)
    return slot_spans(tokenizer, (("user", message),), {"persona": (0, p0, p0 + len(persona))}, ids, p_user_last)["persona"]


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


def bare_messages(grid: Grid) -> Messages:
    """The "bare" condition's chat: the persona dropped. The paper's grid: the task alone; a
    message starting "As {persona}, " loses that prefix; else messages holding {persona} go."""
    if "persona" not in grid.factor_names:
        raise PromptError(f"grid {grid.name!r} has no persona factor (factors: {', '.join(grid.factor_names)}), so "
                          "'bare' (the prompt without its persona) is not defined; drop the 'bare' condition")
    out = []
    for role, content in grid.messages:
        others = [f for f in grid.factor_names if f != "persona" and "{" + f + "}" in content]
        if "{persona}" in content and not content.startswith("As {persona}, ") and others:
            raise PromptError(f"grid {grid.name!r}: the {role} message {content!r} holds {{persona}} and "
                              f"{', '.join('{' + f + '}' for f in others)}: 'bare' would drop them with the persona; "
                              "drop the 'bare' condition, or give the persona a message of its own")
        if content.startswith("As {persona}, "):
            out.append((role, content[len("As {persona}, "):]))
        elif "{persona}" not in content:
            out.append((role, content))
    if not out or out[-1][0] != "user":
        raise PromptError(f"grid {grid.name!r}: no bare (persona-free) chat can be made from its messages "
                          f"{list(grid.messages)}; drop the 'bare' condition")
    return tuple(out)


def role_messages(grid: Grid, cell: Cell, role: str) -> tuple[Messages, Slots]:
    """The chat of one of a cell's prompts and where its slots are. Role letters per factor:
    the factor's letter = the cell's level, B = baseline, S = the swap partner's level; "bare"."""
    values = {}
    for f, letter in zip(grid.factors, role if role != "bare" else [f.letter for f in grid.factors], strict=True):
        level = cell.level(f.name)
        if letter == "B":
            values[f.name] = f.baseline
        elif letter == f.letter:
            values[f.name] = f.levels[level]
        elif letter == "S":
            if f.name not in grid.partners:
                raise PromptError(f"role {role!r} needs swap partners for factor {f.name!r}; none are set")
            values[f.name] = f.levels[grid.partners[f.name][level]]
        else:
            raise PromptError(f"role {role!r} of grid {grid.name!r}: letter {letter!r} at factor {f.name!r}; "
                              f"allowed: {f.letter}, B, S (and L through the length-matched prompt)")
    if role == "bare":
        values.pop("persona", None)
        return fill(bare_messages(grid), values)
    return fill(grid.messages, values)


def role_persona(grid: Grid, cell: Cell, role: str) -> str | None:
    """Persona text of a role's prompt (X's for XY, XB and LY; the baseline's for BY, BB); bare: None."""
    if role == "bare":
        return None
    i = grid.factor_names.index("persona")
    return grid.personas[cell.persona] if role[i] in ("X", "L") else grid.baseline_persona


def role_text(grid: Grid, cell: Cell, role: str) -> str:
    """The user turn of one of a cell's prompts (BB, XB, BY, XY, ...) or "bare"."""
    return role_messages(grid, cell, role)[0][-1][1]


class PromptBook:
    """Encodes each distinct chat once; BB is shared by every cell, XB by a persona's tasks.

    Every prompt carries its slots' spans (the persona's as `span`; none for "bare"). A role
    with L at a factor (paper: "LY") is the length-matched baseline of METHOD.md: the full
    prompt's ids with the factor's span replaced, token for token, by the first |S| tokens
    of the baseline's span (from the prompt with that factor at B) followed, when S is longer,
    by the tokens of `filler` (tokenized once without special tokens, repeated cyclically). It
    has the full prompt's length, p_user_last and spans; ly_text(cell) is the decoded replacement.
    """

    def __init__(self, tokenizer, grid: Grid, filler: str = DEFAULT_FILLER):
        self.tokenizer = tokenizer
        self.grid = grid
        self.filler = filler
        self._cache: dict[Messages, Prompt] = {}
        self._ly: dict[tuple[Cell, str], tuple[Prompt, tuple[int, ...]]] = {}
        self._filler_ids: tuple[int, ...] | None = None

    def get(self, cell: Cell, role: str) -> Prompt:
        if "L" in role:
            return self._length_matched(cell, role)[0]
        messages, slots = role_messages(self.grid, cell, role)
        if messages not in self._cache:
            self._cache[messages] = encode_chat(self.tokenizer, messages, slots)
        return self._cache[messages]

    def ly_text(self, cell: Cell, role: str = LY) -> str:
        """Decoded text that replaces the factor in the cell's length-matched prompt (to record with results)."""
        return self.tokenizer.decode(list(self._length_matched(cell, role)[1]))

    def _filler_tokens(self) -> tuple[int, ...]:
        if self._filler_ids is None:
            hits = _found(self.filler, _special_texts(self.tokenizer))
            if hits:
                raise PromptError(f"LY filler {self.filler!r} contains special-token text {hits}; {PLAIN_TEXT}")
            ids = self.tokenizer(self.filler, add_special_tokens=False)["input_ids"]
            self._filler_ids = tuple(int(i) for i in ids)
        return self._filler_ids

    def _length_matched(self, cell: Cell, role: str) -> tuple[Prompt, tuple[int, ...]]:
        if (cell, role) in self._ly:
            return self._ly[cell, role]
        g = self.grid
        if role.count("L") != 1 or len(role) != len(g.factors):
            raise PromptError(f"role {role!r}: a length-matched role has one L, at one of {len(g.factors)} factors")
        i = role.index("L")
        f = g.factors[i]
        full, base = role[:i] + f.letter + role[i + 1:], role[:i] + "B" + role[i + 1:]
        xy, by = self.get(cell, full), self.get(cell, base)
        xs, bs_ = xy.slot_span(f.name), by.slot_span(f.name)
        if xs is None or bs_ is None:
            raise PromptError(f"cell {cell.key!r}: {full} or {base} prompt has no {f.name} span; no {role} prompt")
        (s, e), (bs, be) = xs, bs_
        n = e - s
        level = f.levels[cell.level(f.name)]
        if n < 1:
            raise PromptError(f"{f.name} {level!r} has an empty token span; no {role} prompt")
        repl = list(by.ids[bs:be][:n])
        if len(repl) < n:
            fill_ids = self._filler_tokens()
            if not fill_ids:
                raise PromptError(
                    f"LY filler {self.filler!r} tokenizes to no tokens, but {f.name} "
                    f"{level!r} ({n} tokens) is longer than the baseline "
                    f"{f.name} {f.baseline!r} ({be - bs} tokens); give a non-empty filler text"
                )
            repl += [fill_ids[j % len(fill_ids)] for j in range(n - len(repl))]
        ly = Prompt(xy.ids[:s] + tuple(repl) + xy.ids[e:], xy.p_user_last, xy.span, xy.spans)
        self._ly[cell, role] = (ly, tuple(repl))
        return self._ly[cell, role]
