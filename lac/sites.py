"""Token sites of METHOD.md, as positions in the sequence prompt + ref.

P = prompt length. ref = the clean XY greedy continuation (REF_TOKENS tokens).
Every site has a position in prompt + ref and a 10-token KL window of ref
teacher-forced after it; the window's next-token distributions sit at
positions P-1+w0 ... P-1+w0+9 (the one predicting ref[w0] first).
"""

from __future__ import annotations

SITES = ("p_user_last", "p_last", "g1", "g2")
TRANSITION = ("p_last", "g1", "g2")
WINDOW = 10  # KL window length (tokens)
REF_TOKENS = 12  # 2 generated sites + 10 window tokens
_WINDOW_START = {"p_user_last": 0, "p_last": 0, "g1": 1, "g2": 2}


def check_sites(sites) -> tuple[str, ...]:
    sites = tuple(sites)
    if not sites:
        raise ValueError(f"no sites given; allowed: {', '.join(SITES)}")
    for s in sites:
        if s not in SITES:
            raise ValueError(f"unknown site {s!r}; allowed: {', '.join(SITES)} (or site=transition)")
    return sites


def site_position(site: str, prompt_len: int, p_user_last: int) -> int:
    """Index of the site in prompt + ref (g1 = first generated token = index P)."""
    if site == "p_user_last":
        return p_user_last
    return prompt_len - 1 + _WINDOW_START[site]


def window_start(site: str) -> int:
    """First ref index of the site's KL window: ref[w0 : w0 + WINDOW]."""
    return _WINDOW_START[site]


def window_first_position(site: str, prompt_len: int) -> int:
    """Position whose next-token distribution predicts ref[w0] (the window's first)."""
    return prompt_len - 1 + _WINDOW_START[site]
