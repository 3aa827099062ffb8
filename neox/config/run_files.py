"""Names in a run directory that the launcher writes and the workers read (both import them from here:
launch and train do not import each other)."""

# The config a launch writes for its workers; rank 0 makes it config.yaml once the run has started
# (neox.train.worker.publish_config), so a launch the workers refuse leaves config.yaml as it was.
PENDING_CONFIG = "config.pending.yaml"
