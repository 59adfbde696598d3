"""Shared fixtures. Nothing here may reach a network: W&B is offline, the hub is never asked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # unreachable on purpose: fail fast, never hang
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf")


@pytest.fixture(autouse=True)
def _activations(tmp_path_factory, monkeypatch):
    """Each test starts with an empty on-disk and in-memory activation cache."""
    from lac import cache

    monkeypatch.setenv("LAC_ACTIVATIONS_DIR", str(tmp_path_factory.mktemp("activations")))
    cache._MEMORY.clear()
    yield
    cache._MEMORY.clear()


def compose(overrides: list[str] | None = None):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hcompose("config", overrides=list(overrides or []))


@pytest.fixture(scope="session")
def qwen():
    """The embedded Qwen2.5-Coder-0.5B-Instruct (converted once into the lac cache), fp32 CPU."""
    from lac.runner import get_model

    return get_model(compose(["model.device=cpu"]).model)


def assert_same_results(a, b, kl_atol: float = 1e-5, geometry_atol: float = 1e-4) -> None:
    """Two results frames agree: same rows, values within float32 noise of differently batched
    forwards (KL well inside METHOD's 1e-4; geometry cosines of small deltas amplify rounding)."""
    import numpy as np
    import pandas as pd

    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    tol = np.where(a.metric.to_numpy() == "kl", kl_atol, geometry_atol)
    diff = np.abs(a.value.to_numpy(float) - b.value.to_numpy(float))
    assert (diff <= tol).all(), f"max difference {diff.max():.3g} in row {int(diff.argmax())}"
