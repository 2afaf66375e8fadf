"""The experiment harness: the command line (:mod:`.cli`), one run or sweep point (:mod:`.runner`), its
record (:mod:`.records`), the optional W&B logger (:mod:`.tracking`) and the speed/memory bench (:mod:`.bench`)."""
