"""Helpers shared by the tests (importable as `support`: tests/conftest.py puts tests/ on sys.path,
pytest's default `prepend` import mode; test modules have no __init__.py, so their basenames must be
unique across folders, which pytest checks at collection).

- `support.runs`: tiny runs through the real launcher: `TINY`, `tiny()`, `launch()`, `start()`,
  `read_metrics()`, `train_losses()`, `wait_for_step()`, `at_checkpoint()`; `workers()`, a run's
  workers alone (no launcher: ~6 s of CPU less a run) where the launcher is not what is tested.
- `support.procs`: `free_port()`, the /dev/shm check (`shm_files()`, `no_shm_leak()`, which with the
  runs' master ports counts only their buffers: pytest-xdist runs another test beside it), `kill_tree()`.
- `support.workers`: `run_workers()`, a function on N spawned CPU processes over gloo; `Checks`,
  several such functions in one spawn, each test asking for its own outcome.
- `support.plans`: real `RunPlan`s from `make_plan` for a composed config.
"""
