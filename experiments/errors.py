"""The one error type of the experiments: a bad command line or config value."""


class ConfigError(ValueError):
    """A bad command line or config value; the message names the key, the value and the fix."""
