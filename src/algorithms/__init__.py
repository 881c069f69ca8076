"""Training algorithms (tasks). Every built-in algorithm is imported here explicitly, so
registration never depends on import order."""
from src.algorithms import classification  # noqa: F401
