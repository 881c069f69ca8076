"""Training algorithms (tasks). Every built-in algorithm is imported here explicitly, so
registration never depends on import order."""

from src.algorithms import (
    byol,
    causal_lm,
    classification,
    clip,
    dino,
    dpo,
    grpo,
    mae,
    masked_lm,
    metric_learning,
    moco,
    ppo,
    rewards,
    seq2seq,
    sequence_classification,
    simclr,
    supervised,
    vicreg,
    vlm,
)
