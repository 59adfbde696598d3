"""Persona spans of every prompt role and the length-matched baseline LY (METHOD.md, "Spans and
the length-matched baseline"), on the embedded Qwen tokenizer and Gemma-2/Llama-3 templates.

Spans are checked independently of the offset mapping that computes them: by decoding token
prefixes of the prompt and comparing character lengths with where the persona sits in the text.
"""

from __future__ import annotations

import copy

import pytest

from lac.grid import Cell, edit_paper_grid
from lac.prompts import (
    DEFAULT_FILLER,
    ROLES,
    PromptBook,
    PromptError,
    encode,
    role_persona,
    role_text,
    user_message,
)
from tests.test_prompts import SHIPPED, old_encode, shipped_grid

QWEN_LIKE_UPPER = (  # a template that rewrites the user content (upper-cases it)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_LIKE_REWORD = (  # rewrites only the frame: "As X" -> "Acting as X"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | replace('As ', 'Acting as ') }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# every test reads the embedded model's tokenizer: embedded_path converts the model on a cold cache
pytestmark = pytest.mark.slow




def _with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def check_span(tok, prompt, message: str, persona: str) -> None:
    """The span holds exactly the tokens that overlap the persona's characters, judged by decoding."""
    s, e = prompt.span
    assert 0 < s < e <= prompt.p_user_last
    text = tok.decode(list(prompt.ids))
    m0 = text.rfind(message)
    assert m0 >= 0, "the decoded prompt holds the message verbatim"
    c0 = m0 + message.index(persona)
    c1 = c0 + len(persona)

    def upto(k: int) -> int:  # characters decoded from the first k tokens
        return len(tok.decode(list(prompt.ids[:k])))

    assert persona.strip() in tok.decode(list(prompt.ids[s:e])).strip()
    assert upto(s) <= c0, "the token before the span holds no persona character"
    assert upto(s + 1) > c0, "the span's first token holds the persona's first character"
    assert upto(e) >= c1, "the span reaches the persona's last character"
    assert upto(e - 1) < c1, "the span's last token holds the persona's last character"


def check_book(tok, grid, filler: str = DEFAULT_FILLER) -> dict[str, int]:
    """Every role of every cell: spans, bitwise-unchanged ids, and LY. Returns LY branch counts."""
    book = PromptBook(tok, grid, filler=filler)
    fill = tok(filler, add_special_tokens=False)["input_ids"]
    counts = {"filler": 0, "prefix_only": 0}
    for cell in grid.cells():
        p = {r: book.get(cell, r) for r in (*ROLES, "bare", "LY")}
        for role in ROLES:
            msg = role_text(grid, cell, role)
            old = old_encode(tok, msg)
            assert (p[role].ids, p[role].p_user_last) == (old.ids, old.p_user_last)
            check_span(tok, p[role], msg, role_persona(grid, cell, role))
        assert p["bare"].span is None and p["bare"].ids == old_encode(tok, grid.tasks[cell.task]).ids
        # XY/XB carry X's span, BY/BB the baseline's: same positions, same tokens
        for a, b in (("XY", "XB"), ("BY", "BB")):
            s, e = p[a].span
            assert p[a].span == p[b].span and p[a].ids[s:e] == p[b].ids[s:e]
        # LY: XY's length and layout, the span holding baseline prefix + cyclic filler
        xy, ly, (s, e), (bs, be) = p["XY"], p["LY"], p["XY"].span, p["BY"].span
        n = e - s
        assert len(ly.ids) == len(xy.ids) and ly.p_user_last == xy.p_user_last and ly.span == xy.span
        assert ly.ids[:s] == xy.ids[:s] and ly.ids[e:] == xy.ids[e:]
        base = list(p["BY"].ids[bs:be])
        expect = base[:n] + [fill[i % len(fill)] for i in range(max(0, n - len(base)))]
        assert list(ly.ids[s:e]) == expect
        assert book.ly_text(cell) == tok.decode(expect)
        counts["filler" if n > len(base) else "prefix_only"] += 1
    # deterministic: a fresh book gives the same LY prompts and texts
    again = PromptBook(tok, grid, filler=filler)
    for cell in grid.cells():
        assert again.get(cell, "LY") == book.get(cell, "LY") and again.ly_text(cell) == book.ly_text(cell)
    return counts


def test_shipped_grids_qwen(qwen_tok):
    total = {"filler": 0, "prefix_only": 0}
    for name in SHIPPED:
        for k, v in check_book(qwen_tok, shipped_grid(name)).items():
            total[k] += v
    assert total["filler"] > 0 and total["prefix_only"] > 0, total  # both LY branches exercised


@pytest.mark.parametrize("which", ["gemma", "llama"])
def test_short_grid_other_templates(request, which):
    tok = request.getfixturevalue(f"{which}_tok")
    check_book(tok, shipped_grid("short"))
    prompt = PromptBook(tok, shipped_grid("short")).get(Cell("yoda", "haiku"), "XY")
    s, e = prompt.span
    assert tok.decode(list(prompt.ids[s:e])).strip() == "Yoda"


@pytest.mark.parametrize("which", ["gemma", "llama"])
def test_long_grid_other_templates(request, which):
    check_book(request.getfixturevalue(f"{which}_tok"), shipped_grid("long"))


def test_persona_merged_with_preceding_space(qwen_tok):
    """" Einstein" is one BPE token; an added token " Yoda" swallows the space the same way."""
    p = encode(qwen_tok, "As Einstein, write a haiku.", "Einstein")
    s, e = p.span
    assert e - s == 1 and qwen_tok.decode([p.ids[s]]) == " Einstein" and qwen_tok.decode([p.ids[s - 1]]) == "As"
    check_span(qwen_tok, p, "As Einstein, write a haiku.", "Einstein")

    from tokenizers import AddedToken

    tok = copy.deepcopy(qwen_tok)
    tok.add_tokens([AddedToken(" Yoda", normalized=False, special=False)])
    p = encode(tok, "As Yoda, write a haiku.", "Yoda")
    s, e = p.span
    assert e - s == 1 and tok.convert_ids_to_tokens(p.ids[s]) == " Yoda"
    assert tok.decode([p.ids[s - 1]]) == "As" and tok.decode([p.ids[e]]) == ","

    grid = edit_paper_grid(shipped_grid("short"), personas={"einstein": "Einstein", "yoda": "Yoda"})
    check_book(qwen_tok, grid)
    book = PromptBook(tok, grid)
    assert book.get(Cell("yoda", "haiku"), "XY").span == (s, e)
    assert book.ly_text(Cell("yoda", "haiku")) == " a"  # one token: the baseline's first


@pytest.mark.parametrize("persona", [
    "Amélie Poulain — café owner (Montmartre, 1997) 🙂",
    "李白",
    "Mr. T.",  # ".," is one token: it straddles the persona's last character
    "the \"Wizard\" of Oz!",
    "'Weird Al' Yankovic",
])
def test_unicode_and_punctuation(qwen_tok, gemma_tok, persona):
    msg = user_message(persona, "write a haiku.")
    for tok in (qwen_tok, gemma_tok):
        p = encode(tok, msg, persona)
        assert (p.ids, p.p_user_last) == (old_encode(tok, msg).ids, old_encode(tok, msg).p_user_last)
        check_span(tok, p, msg, persona)
    grid = edit_paper_grid(shipped_grid("short"), personas={"odd": persona})
    check_book(qwen_tok, grid)


def test_straddling_last_token_in_span(qwen_tok):
    p = encode(qwen_tok, "As Mr. T., write a haiku.", "Mr. T.")
    s, e = p.span
    assert qwen_tok.decode([p.ids[e - 1]]) == ".,"  # holds the persona's last "." and the comma
    assert qwen_tok.decode([p.ids[e]]) == " write"


def test_encode_without_persona_unchanged(qwen_tok):
    msg = "As Yoda, write a haiku."
    assert encode(qwen_tok, msg) == old_encode(qwen_tok, msg)
    assert encode(qwen_tok, msg).span is None
    with_span = encode(qwen_tok, msg, "Yoda")
    assert with_span.ids == old_encode(qwen_tok, msg).ids and with_span.span is not None


@pytest.mark.parametrize("template", [QWEN_LIKE_UPPER, QWEN_LIKE_REWORD], ids=["upper", "reword"])
def test_template_rewriting_persona_refused(qwen_tok, template):
    tok = _with_template(qwen_tok, template)
    tok.name_or_path = "rewriting-model"
    encode(tok, "As Yoda, write a haiku.")  # without spans the prompt is still made
    with pytest.raises(PromptError) as e:
        encode(tok, "As Yoda, write a haiku.", "Yoda")
    assert "'Yoda'" in str(e.value) and "rewriting-model" in str(e.value)
    book = PromptBook(tok, shipped_grid("short"))
    with pytest.raises(PromptError, match="Warren Buffett"):
        book.get(Cell("buffett", "haiku"), "XY")


def test_persona_missing_from_message(qwen_tok):
    with pytest.raises(PromptError, match="'Yoda'.*does not occur"):
        encode(qwen_tok, "As Marx, write a haiku.", "Yoda")


def test_empty_filler_refused_only_when_needed(qwen_tok):
    grid = edit_paper_grid(shipped_grid("short"), personas={"long": "a very patient and kind old lighthouse keeper",
                                                    "short": "Einstein"})
    book = PromptBook(qwen_tok, grid, filler="")
    assert book.ly_text(Cell("short", "haiku")) == " a"  # shorter than the baseline: no filler needed
    with pytest.raises(PromptError) as e:
        book.get(Cell("long", "haiku"), "LY")
    msg = str(e.value)
    assert "filler ''" in msg and "lighthouse keeper" in msg and "a thoughtful person" in msg


def test_filler_with_control_tokens_refused(qwen_tok):
    grid = edit_paper_grid(shipped_grid("short"), personas={"long": "a very patient and kind old lighthouse keeper"})
    book = PromptBook(qwen_tok, grid, filler=" calm<|im_end|>")
    with pytest.raises(PromptError, match="im_end"):
        book.get(Cell("long", "haiku"), "LY")


def test_custom_filler_cycles(qwen_tok):
    grid = edit_paper_grid(shipped_grid("short"), personas={"long": "a very patient and kind old lighthouse keeper"})
    filler = " calm quiet"
    fill = qwen_tok(filler, add_special_tokens=False)["input_ids"]
    assert len(fill) == 2
    cell = Cell("long", "haiku")
    book = PromptBook(qwen_tok, grid, filler=filler)
    ly, xy = book.get(cell, "LY"), book.get(cell, "XY")
    s, e = xy.span
    n_base = 3  # " a", " thoughtful", " person"
    assert e - s > n_base + 2  # the filler repeats
    assert book.ly_text(cell) == " a thoughtful person" + " calm quiet" * ((e - s - n_base) // 2) + (
        " calm" if (e - s - n_base) % 2 else "")
    assert ly.ids != xy.ids and len(ly.ids) == len(xy.ids)
    assert PromptBook(qwen_tok, grid).ly_text(cell) != book.ly_text(cell)  # the filler is configurable
