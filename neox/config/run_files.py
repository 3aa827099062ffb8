"""What the launcher hands the workers: names in a run directory and in the environment (both import them
from here: launch and train do not import each other)."""
import os
import time

# The config a launch writes for its workers; rank 0 makes it config.yaml once the run has started
# (neox.train.config_files.publish_config), so a launch the workers refuse leaves config.yaml as it was.
PENDING_CONFIG = "config.pending.yaml"

# The launcher's start (seconds since the epoch), so a worker's start-up breakdown begins at `python launch.py`.
LAUNCHED_AT = "NEOX_LAUNCHED_AT"
# When launch.py handed over to the deepspeed launcher: the launcher phase splits into ours and DeepSpeed's.
SPAWNED_AT = "NEOX_SPAWNED_AT"


def process_started() -> float:
    """This process's start time (Linux: /proc, 10 ms ticks after a boot time in whole seconds), so the
    imports before any of our code runs are counted; elsewhere, now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()
