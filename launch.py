#!/usr/bin/env python
"""neox's entry point: compose the run config, validate it, dispatch the workers.

    python launch.py                                   # tiny model, embedded corpus, this machine
    python launch.py model=6B parallelism=pp4_tp8 cluster=slurm
    python launch.py -m model=125M,350M optim.lr=1e-4,3e-4   # a sweep, one run dir per job

Every config is validated before any worker starts; a problem ends with one line naming the fix.
"""
import sys

from neox.launch.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
