"""Callbacks, one file each; every built-in is imported here so registration never depends on order."""
from src.core.callbacks.base import Callback  # noqa: F401
