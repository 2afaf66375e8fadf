"""The ``lacache`` command (installed with the package; ``run.py`` in the repository is the same):
``lacache model=<m> cache=<policy> task=<task> [key=value ...]``, or a sweep with ``-m``. The configs
are read from the package (``pkg://lacache.configs``), so it works from any directory."""

import sys

import hydra
from omegaconf import DictConfig

from lacache.harness import runner


@hydra.main(version_base="1.3", config_path="pkg://lacache.configs", config_name="config")
def run(cfg: DictConfig) -> None:
    runner.main(cfg)


def swept_group_settings(argv: list[str]) -> list[str]:
    """``-m cache=h2o,tova cache.budget=256``: to set up a sweep, Hydra first applies every override but
    the sweeps to the *default* config, whose cache (the full cache) has no ``budget``, and rejects the
    line. A plain setting of a swept group is therefore passed on as ``++group.key=value`` (set, or add
    where absent); each point still checks its settings against its own policy class."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a malformed line: Hydra reports it itself
        return argv
    swept = {o.key_or_group for o in overrides if o.is_sweep_override() and "." not in o.key_or_group and o.package is None}

    def of_swept_group(arg: str) -> bool:
        key = arg.split("=", 1)[0]
        return "=" in arg and not arg.startswith(("-", "+", "~")) and "." in key and key.partition(".")[0] in swept

    return [f"++{arg}" if of_swept_group(arg) else arg for arg in argv]


def register_slurm_launcher() -> None:
    """``hydra/launcher=slurm``'s class (``hydra_plugins/lacache_slurm``), registered by hand: Hydra finds plugins by
    scanning the ``hydra_plugins`` folders on sys.path, and an editable install's is not among them."""
    from hydra.core.plugins import Plugins
    from hydra_plugins import lacache_slurm

    if lacache_slurm.SlurmLauncher is not None:  # the cluster extra is installed
        Plugins.instance().register(lacache_slurm.LacacheSlurmLauncher)


def main() -> None:
    sys.argv[1:] = swept_group_settings(sys.argv[1:])
    register_slurm_launcher()
    try:
        run()
    except SystemExit as stop:
        if stop.code == 1 and not runner.STARTED:  # Hydra rejected the command line before any run: an invalid setting
            runner.explain_overrides(sys.argv[1:])
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
