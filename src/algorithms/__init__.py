"""Training algorithms (tasks). Every built-in algorithm is imported here explicitly, so
registration never depends on import order."""
from src.algorithms import (byol, causal_lm, classification, dino, dpo, mae,  # noqa: F401
                            metric_learning, moco, sequence_classification, simclr, vicreg)
