"""tessera: one YAML file per experiment, from a CNN on a laptop CPU to an LLM on many GPUs.

The Python API (heavy libraries load on first use, so ``python -m src.main --help`` stays fast):

    from src import Experiment
    exp = Experiment.from_yaml("configs/exp001.yaml", ["trainer.max_steps=50"])
    metrics = exp.fit()
    exp.evaluate(); exp.predict()
"""

__all__ = ["Experiment", "UserError"]


def __getattr__(name: str):
    if name in __all__:
        from src.run import api

        return getattr(api, name)
    raise AttributeError(f"module 'src' has no attribute {name!r}")
