"""Hydra entry point: `python -m lac.run [overrides]`, `-m` for a multirun sweep.

Thin by design: compose the config, hand it to lac.runner.run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lac.runner import run

CONF = str(Path(__file__).resolve().parent.parent / "conf")  # the repo's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    logging.getLogger("lac").setLevel(logging.INFO)
    run(cfg, job_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
