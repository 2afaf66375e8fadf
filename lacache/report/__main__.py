"""``python -m lacache.report``: the paper tables and figures (:func:`lacache.report.tables.main`)."""

from lacache.report.tables import main

main()
