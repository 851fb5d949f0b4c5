"""Errors the stage commands turn into clear messages and exit codes."""


class ConfigError(Exception):
    """params.yaml (or a command-line override) is invalid; the message names the dotted key."""


class DataError(Exception):
    """Input data is unusable; the message names the file and what is wrong with it."""
