"""Tables and figures from run records: ``python -m lacache.report`` (:mod:`.tables`), the figures they
use (:mod:`.figures`) and the ladder picture (:mod:`.ladder_plot`)."""
