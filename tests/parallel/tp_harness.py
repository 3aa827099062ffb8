"""Old name of support.workers, kept for tests/checkpoint/test_resume.py until it imports
`support.workers` itself."""
from support.procs import free_port  # noqa: F401
from support.workers import run_workers  # noqa: F401
