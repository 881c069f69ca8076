"""Training algorithms (tasks). Every built-in algorithm is imported here explicitly, so
registration never depends on import order."""
from src.algorithms import (byol, classification, dino, mae, metric_learning, moco,  # noqa: F401
                            simclr, vicreg)
