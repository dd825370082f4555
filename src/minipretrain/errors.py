"""User-facing errors: the CLI prints these as one line and exits non-zero (a traceback means a bug)."""


class UserError(Exception):
    """Bad input from the user: a file, a config key, a checkpoint. The message says what to do."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass
