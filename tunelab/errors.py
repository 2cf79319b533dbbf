"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths, flags). The message must say what is wrong, where, and how to fix it."""


class ConfigError(UserError):
    """A config file or override is invalid."""


class DataError(UserError):
    """A dataset file or record is invalid."""


class TrainingStopped(Exception):
    """The run stopped early for a reason the user must act on (the message says which); exit code 1."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved; exit code 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
