"""The ``lacache`` command (installed with the package; ``run.py`` in the repository is the same):
``lacache model=<m> cache=<policy> task=<task> [key=value ...]``, or a sweep with ``-m``. The configs
are read from the package (``pkg://lacache.configs``), so it works from any directory."""

import sys

import hydra
from omegaconf import DictConfig

from lacache import runner


@hydra.main(version_base="1.3", config_path="pkg://lacache.configs", config_name="config")
def run(cfg: DictConfig) -> None:
    runner.main(cfg)


def main() -> None:
    try:
        run()
    except SystemExit as stop:
        if stop.code == 1 and not runner.STARTED:  # Hydra rejected the command line before any run: an invalid setting
            runner.explain_overrides(sys.argv[1:])
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
