"""`python -m neox.launch.slurm <folder>`: one Slurm task of a neox job (see neox.launch.slurm.task)."""
import sys

from neox.launch.slurm.task import main

sys.exit(main(sys.argv[1:]))
