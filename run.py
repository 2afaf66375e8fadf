"""Run one experiment (or a sweep with -m): python run.py model=<m> cache=<policy> task=<task>.
The same as the installed ``lacache`` command (:mod:`lacache.harness.cli`)."""

from lacache.harness.cli import main

if __name__ == "__main__":
    main()
