"""Where Hydra finds the configs.

conf/ (with the sweep presets, conf/sweep -> ../sweeps) lives at the top of the repository, outside
the package, so a checkout and an editable install read it there: one source of truth, edits take
effect at once. A wheel (`pip install .`, not editable) has no repository around it; it ships the
same files as package data in lac/conf (see pyproject's package-dir), and that copy is used instead.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> str:
    """The config directory for Hydra: the repo's conf/ in a checkout or editable install (a
    pyproject.toml beside it), else the installed package data lac/conf."""
    repo = _PACKAGE.parent
    if (repo / "pyproject.toml").is_file() and (repo / "conf" / "config.yaml").is_file():
        return str(repo / "conf")
    return str(_PACKAGE / "conf")
