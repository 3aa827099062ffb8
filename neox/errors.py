"""Errors neox raises. Library code raises; only entry points turn these into one line + exit code."""

# The exit status of a trainer that stopped for preemption after saving a checkpoint: EX_TEMPFAIL from
# sysexits.h, "a temporary failure; the user is invited to retry". The Slurm launcher requeues on it.
EXIT_REQUEUE = 75
# Ctrl-C: 128 + SIGINT, what a shell reports for it; the launcher and every worker end with it.
EXIT_INTERRUPTED = 130


class NeoxError(Exception):
    """Base class: the message is one line that names the problem and the fix."""


class ConfigError(NeoxError):
    """The run config is invalid or the layout is impossible."""


class LaunchError(NeoxError):
    """Workers cannot be started here (hostfile, GPUs, launcher, Slurm)."""


class DataError(NeoxError):
    """A data file, tokenizer or dataset spec is missing, malformed or inconsistent."""


class CheckpointError(NeoxError):
    """A checkpoint is missing, corrupt or incompatible with the run."""


class KernelError(NeoxError):
    """A fused kernel was asked for but cannot run on this input or machine."""


class TrainingError(NeoxError):
    """Training cannot go on: repeated non-finite steps, or a dead or hung peer rank."""
