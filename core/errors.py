"""Errors shared across packages."""


class StartupError(Exception):
    """A failure at start-up that is explained in one message (no traceback)."""
