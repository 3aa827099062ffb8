"""Old name of support.runs, kept for tests/convert until it imports `support.runs` itself."""
from support.procs import shm_files  # noqa: F401
from support.runs import REPO, TINY, launch, read_metrics, train_losses  # noqa: F401
