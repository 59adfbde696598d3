"""Persona-marker scoring (section 6 of arXiv 2605.23147). Pure Python, no torch.

Rules, as in the paper's ``scripts/v17_behavioral_markers.py``:

* the text is lower-cased;
* a marker containing a space or a hyphen matches as a plain substring of the
  lower-cased text (marker lower-cased too), e.g. "step-by-step" or
  "single point of failure" - so "like a" also matches inside "unlike any";
* any other marker matches as a whole word: ``re.search(r"\\b" + re.escape(m) + r"\\b")``
  on the lower-cased text (marker lower-cased), so "source" does not match
  "sources" and "SPOF" matches "spof" / "SpOF" in any case.

``\\b`` in Python's ``re`` with ``str`` patterns is Unicode-aware: "é" is a word
character, so "sauté" matches in "un sauté rapide", and "saute" does *not* match
inside "sauté" (there is no word boundary between "e" and "é"; "saute" is a
prefix of the word, not the word).

Lawyer stem: the paper's appendix writes ``indemnif*`` but its code matched the
bare marker "indemnif" as a whole word, so only the literal word "indemnif"
matches; "indemnify", "indemnification" do not. We reproduce the code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

__all__ = ["check_markers", "marker_hits", "score"]


def _is_substring_marker(marker: str) -> bool:
    return " " in marker or "-" in marker


@lru_cache(maxsize=256)
def _compile(
    markers: tuple[str, ...],
) -> tuple[tuple[str, str | None, re.Pattern[str] | None], ...]:
    """Per marker: (marker, lower-cased substring or None, whole-word pattern or None)."""
    out = []
    for m in markers:
        low = m.lower()
        if _is_substring_marker(m):
            out.append((m, low, None))
        else:
            out.append((m, None, re.compile(r"\b" + re.escape(low) + r"\b")))
    return tuple(out)


def marker_hits(text: str, markers: Sequence[str]) -> list[str]:
    """Distinct markers (as given) that match ``text``, in the markers' order."""
    low = text.lower()
    hits: list[str] = []
    seen: set[str] = set()
    for m, sub, pat in _compile(tuple(markers)):
        if m in seen:
            continue
        if (sub is not None and sub in low) or (pat is not None and pat.search(low)):
            hits.append(m)
            seen.add(m)
    return hits


def score(text: str, markers: Sequence[str]) -> dict:
    """``{"marker_any": 0 or 1, "marker_distinct": int, "hits": [...]}`` for one text."""
    hits = marker_hits(text, markers)
    return {"marker_any": int(bool(hits)), "marker_distinct": len(hits), "hits": hits}


def check_markers(markers: Mapping[str, Sequence[str]], grid_name: str) -> None:
    """Raise ValueError (naming persona and grid) for an empty list or an empty/non-string marker."""
    for persona, ms in markers.items():
        if isinstance(ms, str) or not isinstance(ms, Sequence):
            raise ValueError(
                f"grid {grid_name!r}: markers of persona {persona!r} must be a list of strings, "
                f"got {type(ms).__name__}"
            )
        if len(ms) == 0:
            raise ValueError(f"grid {grid_name!r}: persona {persona!r} has an empty marker list")
        for i, m in enumerate(ms):
            if not isinstance(m, str):
                raise ValueError(
                    f"grid {grid_name!r}: persona {persona!r} marker #{i} is not a string: {m!r}"
                )
            if not m.strip():
                raise ValueError(
                    f"grid {grid_name!r}: persona {persona!r} marker #{i} is an empty string"
                )
