"""Run one experiment (or a sweep with -m): python run.py model=<m> cache=<policy> task=<task>."""

import hydra
from omegaconf import DictConfig

from lacache.runner import main


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def run(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    run()
