"""The numerics version guards against stale results: numbers may not change while it stays the same."""

from __future__ import annotations

import pytest

from lac import numerics


def _diffs(got, want, path="") -> list[str]:
    """Every place two fingerprints differ: ints and strings exactly, floats to the project's fp32 bound
    (rtol 1e-3 + atol 1e-6). Tighter fails across CPUs: on an AVX2 AMD EPYC host the fingerprint written on
    an earlier VM differs by up to 6.8e-7 absolute (1.1e-4 relative, KL 0.0061), from kernel rounding."""
    if isinstance(want, float) or isinstance(got, float):
        ok = abs(got - want) <= 1e-6 + 1e-3 * abs(want)
        return [] if ok else [f"{path}: {got!r} != {want!r}"]
    if isinstance(want, (list, dict)):
        if type(got) is not type(want) or len(got) != len(want):
            return [f"{path}: shape differs"]
        keys = want.keys() if isinstance(want, dict) else range(len(want))
        return [d for k in keys for d in _diffs(got[k], want[k], f"{path}/{k}")]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


@pytest.fixture(scope="module")
def current():
    return numerics.fingerprint()


def test_numbers_unchanged_or_version_bumped(current):
    stored = numerics.stored()
    assert stored["version"] == numerics.NUMERICS_VERSION, (
        "NUMERICS_VERSION was bumped: regenerate the fingerprint with `python -m lac.numerics --write`")
    diffs = _diffs(current, stored["fingerprint"])
    assert not diffs, (
        f"lac's numbers changed ({len(diffs)} values, first: {diffs[:3]}) but NUMERICS_VERSION is still "
        f"{numerics.NUMERICS_VERSION}: bump it in lac/numerics.py and run `python -m lac.numerics --write`")


def test_fingerprint_covers_every_intervention_site_and_generation(current):
    from lac.sites import SITES

    assert {r[1] for r in current["kl"]} == set(numerics.PAPER)
    assert {r[2] for r in current["kl"]} == set(SITES)
    assert any(r[4] > 1e-3 for r in current["kl"])  # patches that change the output, not zeros
    assert {g[1] for g in current["generations"]} == {"clean", "additive", "bare"}


def test_a_change_of_numbers_is_caught(monkeypatch, current):
    """KL taken in the wrong direction, KL(P_int || P_clean) (a plausible bug), changes the fingerprint."""
    from lac import patching
    from lac.metrics import kl_window

    monkeypatch.setattr(patching, "kl_window", lambda clean, other: kl_window(other, clean))
    assert _diffs(numerics.fingerprint(), current)


def test_job_and_capture_keys_carry_the_numerics_version(monkeypatch):
    from lac.config import job_key
    from tests.conftest import compose

    cfg = compose(["tracker=none"])
    before = job_key(cfg)
    monkeypatch.setattr("lac.config.NUMERICS_VERSION", numerics.NUMERICS_VERSION + 1)
    assert job_key(cfg) != before
