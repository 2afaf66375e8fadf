"""Run one experiment (or a sweep with -m): python run.py model=<m> cache=<policy> task=<task>.
The same as the installed ``lacache`` command (:mod:`lacache.cli`)."""

from lacache.cli import main

if __name__ == "__main__":
    main()
