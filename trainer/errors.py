"""The trainer's error kinds, free of DeepSpeed so that sampling and evaluation can raise and catch them."""


class RunError(RuntimeError):
    """A problem found before training starts (bad data, missing files), reported alike on every rank."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; `latest` still names the last complete one."""
