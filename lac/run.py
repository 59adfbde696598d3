"""Hydra entry point: `python -m lac.run [overrides]`, `-m` for a multirun sweep.

Thin by design: compose the config, hand it to lac.runner.run.
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lac.paths import conf_dir
from lac.runner import run

CONF = conf_dir()  # the repo's conf/ in a checkout, the packaged lac/conf in a wheel


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    logging.getLogger("lac").setLevel(logging.INFO)
    run(cfg, job_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
