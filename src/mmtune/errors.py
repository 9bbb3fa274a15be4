"""Errors a person can act on: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint); shown without a traceback."""


class ConfigError(UserError):
    """A config key, type or value that cannot be used."""


class DataError(UserError):
    """A data file, column or record that cannot be read."""


class CheckpointError(UserError):
    """A checkpoint or model folder that cannot be loaded."""
