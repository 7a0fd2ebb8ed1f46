"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class TempflowError(Exception):
    """An error caused by the user's input; its message says how to fix it."""


class ConfigError(TempflowError):
    """A configuration key or value is not allowed."""


class PromptError(TempflowError):
    """A prompt is outside the grammar, or a prompt file is missing or empty."""


class ModelLoadError(TempflowError):
    """A model name or folder cannot be loaded."""
