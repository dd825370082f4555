"""User-facing errors: the CLI prints these as one line and exits non-zero (a traceback means a bug)."""


class UserError(Exception):
    """Bad input from the user: a file, a config key, a checkpoint. The message says what to do."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped early, try again": a scheduler should resume the run


class Preempted(Exception):
    """The run stopped on a signal (SIGTERM, SIGINT, SIGUSR1) after saving a checkpoint; the message says how to
    continue. Not a failure: the CLI exits with PREEMPTED_EXIT_CODE."""
