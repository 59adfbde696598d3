"""lac.markers: the paper's persona-marker rules, and agreement with its v17 script's output."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

import lac
from lac.markers import check_markers, marker_hits, score
from tests.conftest import DATA

GRIDS = Path(lac.__file__).parent / "data" / "paper-grids.yaml"
REFERENCE = DATA / "embedded-qwen0.5-v17.json"
MARKERS = yaml.safe_load(GRIDS.read_text())["markers"]


# --------------------------------------------------------------------------- rules


def test_substring_marker_with_space():
    ms = ["single point of failure"]
    assert marker_hits("It has a Single Point Of Failure here.", ms) == ms
    # plain substring, no word boundaries: matches inside longer words too
    assert marker_hits("xsingle point of failures", ms) == ms
    assert marker_hits("single point, of failure", ms) == []
    assert marker_hits("unlike any other", ["like a"]) == ["like a"]


def test_substring_marker_with_hyphen():
    ms = ["trauma-informed", "fault-tolerant"]
    assert marker_hits("a Trauma-Informed approach", ms) == ["trauma-informed"]
    assert marker_hits("non-fault-tolerantly", ms) == ["fault-tolerant"]
    assert marker_hits("trauma informed, fault tolerant", ms) == []


def test_whole_word_marker():
    assert marker_hits("we ship it", ["ship"]) == ["ship"]
    assert marker_hits("relationship and shipping", ["ship"]) == []
    assert marker_hits("ship.", ["ship"]) == ["ship"]
    assert marker_hits("(ship)", ["ship"]) == ["ship"]
    assert marker_hits("lean-ish", ["lean"]) == ["lean"]  # '-' is a word boundary
    assert marker_hits("clean", ["lean"]) == []


def test_overlap_source_vs_sources():
    ms = ["sources", "source"]
    assert marker_hits("check your sources", ms) == ["sources"]
    assert marker_hits("a source said", ms) == ["source"]
    assert marker_hits("a source, then more sources", ms) == ["sources", "source"]
    # multi-word markers containing them are substrings
    assert marker_hits("primary sources", ["primary source"]) == ["primary source"]


def test_case_insensitive():
    ms = ["SPOF", "MVP", "French"]
    assert marker_hits("spof mvp french", ms) == ms
    assert marker_hits("SpOf, Mvp and FRENCH", ms) == ms
    assert marker_hits("spoofed mvps frenchy", ms) == []


def test_hyphen_vs_space_variants():
    ms = MARKERS["teacher"]
    assert "step-by-step" in ms and "step by step" in ms
    assert marker_hits("a step-by-step guide", ms) == ["step-by-step"]
    assert marker_hits("step by step", ms) == ["step by step"]
    assert marker_hits("Step By Step, then STEP-BY-STEP", ms) == ["step by step", "step-by-step"]


def test_accents_unicode_word_boundaries():
    ms = ["sauté", "saute"]
    assert marker_hits("un Sauté rapide", ms) == ["sauté"]
    assert marker_hits("SAUTÉ", ms) == ["sauté"]  # upper-case accent lower-cases
    assert marker_hits("saute the onions", ms) == ["saute"]
    # \b is Unicode-aware for str patterns: 'é' is a word character, so "saute"
    # is not a whole word inside "sauté" (no boundary between 'e' and 'é') ...
    assert re.search(r"\bsaute\b", "sauté") is None
    assert marker_hits("sauté", ["saute"]) == []
    # ... and an accented letter next to a marker blocks the match too
    assert marker_hits("sautéed", ["sauté"]) == []
    assert marker_hits("flavour and flavor", ["flavor", "flavour"]) == ["flavor", "flavour"]
    assert marker_hits("flavours", ["flavour"]) == []


def test_indemnif_is_bare_word_only():
    ms = MARKERS["lawyer"]
    assert "indemnif" in ms
    assert marker_hits("indemnify the client", ms) == []
    assert marker_hits("an indemnification clause", ms) == []
    assert marker_hits("see indemnif.", ms) == ["indemnif"]


def test_distinct_and_order():
    ms = ["b", "a", "c"]
    assert marker_hits("a a a b b", ms) == ["b", "a"]
    assert marker_hits("a b", ["a", "a"]) == ["a"]  # duplicates count once


def test_score():
    assert score("Latency and THROUGHPUT, latency", MARKERS["engineer"]) == {
        "marker_any": 1,
        "marker_distinct": 2,
        "hits": ["throughput", "latency"],
    }
    assert score("nothing here", MARKERS["engineer"]) == {
        "marker_any": 0,
        "marker_distinct": 0,
        "hits": [],
    }


def test_yaml_markers_are_valid():
    check_markers(MARKERS, "paper")  # must not raise
    assert set(MARKERS) == {
        "engineer",
        "counselor",
        "founder",
        "teacher",
        "journalist",
        "doctor",
        "lawyer",
        "chef",
    }


# --------------------------------------------------------------------------- check_markers


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"chef": []}, "empty marker list"),
        ({"chef": ["fresh", ""]}, "empty string"),
        ({"chef": ["fresh", "  "]}, "empty string"),
        ({"chef": ["fresh", 3]}, "not a string"),
        ({"chef": ["fresh", None]}, "not a string"),
        ({"chef": "fresh"}, "list of strings"),
    ],
)
def test_check_markers_errors(bad, fragment):
    with pytest.raises(ValueError, match=fragment) as e:
        check_markers({"engineer": ["SPOF"], **bad}, "my-grid")
    assert "'chef'" in str(e.value)
    assert "'my-grid'" in str(e.value)


# --------------------------------------------------------------------------- reference


DATA_SHA256 = {
    "embedded-qwen0.5-v15.json": "ce8d6f9927d89a6dfa1e5e8deffd1fba9c5554f45f3b3ec2a37a9aa9686a86f6",
    "embedded-qwen0.5-v16.json": "c9743e821082b53432677d6fec95c77cf54019e4a68481d23fa99dfce0856095",
    "embedded-qwen0.5-v17.json": "8ce8115c54fb775805c81c1071c9798f8601bce4ad57e863baeecd455e21df26",
}


def test_reference_data_is_unchanged():
    """tests/data holds the paper scripts' output byte for byte (tests/data/README.md)."""
    for name, sha in DATA_SHA256.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == sha, name


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


def test_reference_markers_equal_yaml(reference):
    assert reference["persona_markers"] == MARKERS


def _cases(reference):
    for cell, conds in reference["results"].items():
        persona = cell.split("__")[0]
        for cond, r in conds.items():
            yield cell, persona, cond, r


def test_reference_hits(reference):
    n = 0
    for cell, persona, cond, r in _cases(reference):
        ms = reference["persona_markers"][persona]
        s = score(r["text"], ms)
        where = f"{cell}/{cond}"
        assert set(s["hits"]) == set(r["hits"]), where
        assert s["hits"] == r["hits"], where  # order agrees too
        assert s["marker_distinct"] == r["count"], where
        assert s["marker_any"] == int(r["any"]), where
        n += 1
    assert n == 24 * 4
    # the reference exercises both rule kinds and some hits at all
    hits = {h for *_, r in _cases(reference) for h in r["hits"]}
    assert any(" " in h or "-" in h for h in hits)
    assert any(" " not in h and "-" not in h for h in hits)


def test_reference_summary_and_per_persona(reference):
    conds = reference["summary"].keys()
    for cond in conds:
        scores = [
            score(r["text"], reference["persona_markers"][p])
            for _, p, c, r in _cases(reference)
            if c == cond
        ]
        summ = reference["summary"][cond]
        assert len(scores) == summ["total_cells"]
        assert sum(s["marker_any"] for s in scores) == summ["any_present_count"]
        assert sum(s["marker_any"] for s in scores) / len(scores) == pytest.approx(
            summ["any_present_rate"]
        )
        assert sum(s["marker_distinct"] for s in scores) / len(scores) == pytest.approx(
            summ["distinct_mean"]
        )
        for persona, per in reference["per_persona"].items():
            got = sum(
                score(r["text"], reference["persona_markers"][p])["marker_any"]
                for _, p, c, r in _cases(reference)
                if c == cond and p == persona
            )
            assert got == per[cond], (persona, cond)
