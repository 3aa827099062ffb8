"""python -m neox.train <run_dir>/config.yaml : one worker rank (started by the launcher)."""
import sys

from neox.train.failures import exit_quietly_on_interrupt

exit_quietly_on_interrupt()  # before the slow imports below: Ctrl-C while starting is quiet too
from neox.train.worker import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
