"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths, flags). The message must say what is wrong, where, and how to fix it."""


class ConfigError(UserError):
    """A config file or override is invalid."""


class DataError(UserError):
    """A dataset file or record is invalid."""
