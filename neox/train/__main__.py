"""python -m neox.train <run_dir>/config.yaml : one worker rank (started by the launcher)."""
import sys

from neox.train.worker import main

sys.exit(main(sys.argv[1:]))
