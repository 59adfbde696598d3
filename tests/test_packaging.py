"""A non-editable install (`pip install .` or a built wheel) carries its configs and sweep presets.

conf/ and sweeps/ sit at the top of the repository; the wheel ships them as lac/conf (presets in
lac/conf/sweep, real files where the checkout has the conf/sweep -> ../sweeps symlink). The wheel
test installs into a fresh venv that sees the heavy dependencies through a .pth listing this
interpreter's site-packages (a .pth does not run the .pth files of the directories it lists, so
the editable install's finder for the checkout's lac never loads) and runs from outside the repo.
"""

from __future__ import annotations

import os
import shutil
import site
import stat
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from lac.paths import conf_dir

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "lac", "conf", "sweeps")  # what the build reads


def test_checkout_uses_the_repos_conf():
    assert Path(conf_dir()) == REPO / "conf"
    assert (Path(conf_dir()) / "sweep" / "paper_table1.yaml").is_file()


def _sh(cmd, cwd, env=None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the sources: no build/ or egg-info in the shared checkout, and no
    stale build/lib files from an earlier build slipping into the wheel."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    assert (src / "conf" / "sweep").is_symlink()  # built the way the checkout is laid out
    _sh([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", tmp / "dist"], cwd=src, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = (tmp / "dist").glob("lac-*.whl")
    return wheel


def _venv(tmp: Path) -> Path:
    """A venv without system site-packages, plus a .pth naming this interpreter's site dirs."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_sh([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp).strip())
    dirs = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (purelib / "outer-site-packages.pth").write_text("".join(f"{d}\n" for d in dirs if os.path.isdir(d)))
    return python


@pytest.mark.slow
def test_wheel_install_composes_the_default_config_and_a_preset(tmp_path):
    pytest.importorskip("setuptools", reason="builds with --no-build-isolation (offline)")
    wheel = _build_wheel(tmp_path)

    with zipfile.ZipFile(wheel) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    shipped = {n for n in infos if n.startswith("lac/conf/")}
    expected = {"lac/conf/" + p.relative_to(REPO / "conf").as_posix()
                for p in (REPO / "conf").rglob("*") if p.suffix == ".yaml"}  # rglob: not into links
    expected |= {"lac/conf/sweep/" + p.name for p in (REPO / "sweeps").iterdir()
                 if p.suffix in (".yaml", ".sh")}
    expected |= {"lac/data/" + p.name for p in (REPO / "lac" / "data").iterdir() if p.is_file()}
    expected |= {"lac/" + p.relative_to(REPO / "lac").as_posix() for p in (REPO / "lac").rglob("*.py")}
    missing = expected - set(infos)
    assert not missing, f"missing from the wheel (pyproject's package-data): {sorted(missing)}"
    assert {"lac/conf/config.yaml", "lac/conf/sweep/paper_table1.yaml", "lac/paths.py"} <= set(infos)
    assert not [n for n in shipped if stat.S_ISLNK(infos[n].external_attr >> 16)], "symlinks in the wheel"

    python = _venv(tmp_path)
    _sh([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
        cwd=tmp_path, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})

    work = tmp_path / "work"  # outside the repo: nothing of the checkout on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONNOUSERSITE="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", HYDRA_FULL_ERROR="1")
    where = _sh([python, "-c", "import lac, lac.paths; print(lac.__file__); print(lac.paths.conf_dir())"],
                cwd=work, env=env).split()
    venv_dir = (tmp_path / "venv").resolve()
    assert Path(where[0]).resolve().is_relative_to(venv_dir), f"lac imported from {where[0]}"
    assert Path(where[1]).resolve().is_relative_to(venv_dir), f"configs read from {where[1]}"

    default = _sh([python, "-m", "lac.run", "--cfg", "job", "tracker=none"], cwd=work, env=env)
    assert "name: qwen0.5" in default and "mode: kl" in default and "sweep_name: adhoc" in default
    preset = _sh([python, "-m", "lac.run", "--cfg", "job", "+sweep=paper_table1", "tracker=none"],
                 cwd=work, env=env)
    assert "sweep_name: paper_table1" in preset and "layer: paper" in preset
    assert not (work / "outputs").exists()  # --cfg composes and prints, runs nothing
