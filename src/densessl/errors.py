"""User-facing errors: each names the file, the field and the fix, and the CLI prints it without a traceback."""


class DenseSSLError(Exception):
    """An error caused by the user's input (config, data, checkpoint), not by a bug in densessl."""


class ConfigError(DenseSSLError):
    pass


class DataError(DenseSSLError):
    pass


class CheckpointError(DenseSSLError):
    pass
