"""``hydra/launcher=slurm`` (``configs/hydra/launcher/slurm.yaml``): the submitit plugin's SLURM launcher, with
a submission that SLURM refuses, or a machine without ``sbatch``, ending in one line and exit 2 instead of a
traceback. Hydra takes launchers only from the ``hydra_plugins`` package, hence this folder; ``lacache.harness.cli``
registers the class too, as Hydra's scan misses an editable install's ``hydra_plugins``."""

import shutil
import subprocess

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # the cluster extra is not installed: hydra/launcher=slurm then fails to compose, naming it
    SlurmLauncher = None

HINT = "check hydra.launcher.partition, gpus_per_node, account, qos and constraint against `sinfo -o '%P %G'`"

if SlurmLauncher is not None:

    class LacacheSlurmLauncher(SlurmLauncher):
        def launch(self, job_overrides, initial_job_idx):
            from submitit.core.utils import FailedJobError, FailedSubmissionError

            from lacache.harness.runner import fail

            if shutil.which("sbatch") is None:
                fail("hydra/launcher=slurm could not submit the sweep: sbatch is not on this machine's PATH "
                     "(submit from a SLURM cluster's login node, or use hydra/launcher=joblib here)")
            try:
                return super().launch(job_overrides, initial_job_idx)
            except FailedSubmissionError as err:
                fail(f"hydra/launcher=slurm could not submit the sweep: {' '.join(str(err).split())}")
            except FailedJobError as err:
                if not isinstance(err.__cause__, subprocess.CalledProcessError):
                    raise  # a job that failed on its node after submission, not a refused submission
                fail(f"hydra/launcher=slurm could not submit the sweep: {' '.join(str(err).split()) or 'sbatch failed'} "
                     f"({HINT})")
