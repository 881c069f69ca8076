"""``python -m src.main prepare --config C [overrides]``: build what a config's data needs before
training (token stores, a trained tokenizer; an image folder's checked listing, shard indexes,
decoded images) and say where each store is, how big, how long.

Run it on a CPU node before the GPU job starts: the job then finds every store in the cache
(``data.cache_dir``, ``$TESSERA_CACHE``, or ``~/.cache/tessera``) and starts at once.
"""

from __future__ import annotations

import time

from src.core.errors import ArgumentParser


def main(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="python -m src.main prepare",
        description="Tokenize a config's data into the token store cache, without training.",
    )
    p.add_argument("--config", "-c", required=True, help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_imports()
    args = p.parse_intermixed_args(argv)
    from pathlib import Path

    from src.core.console import duration
    from src.core.registry import DATASETS
    from src.run.experiment import prepare

    cfg, _ = prepare(args.config, args.overrides, args.imports)
    t0 = time.perf_counter()
    data = DATASETS.build(
        {"type": cfg.data.type, **(cfg.data.model_extra or {})},
        "data",
        seed=cfg.seed,
        run_dir=Path(cfg.logging.root) / cfg.name,
    )
    stores = data.info.extra.get("token_stores", [])
    extra = data.info.extra
    if "images_checked" in extra or "shards" in extra:
        what = (
            f"{extra['images_checked']:,} images checked (the others were in the cache)"
            if "images_checked" in extra
            else f"{extra['shards']:,} shards indexed"
        )
        print(
            f"data     {cfg.data.type}: {data.info.num_samples:,} training samples, {what}"
            + ("; decoded images cached" if extra.get("decoded") else "")
        )
    elif not stores:
        print(f"data     {cfg.data.type}: nothing to prepare (it keeps no token store)")
    for fact in stores:
        built = fact["built_seconds"]
        print(
            f"store    {fact['path']}: {fact['tokens']:,} tokens, {fact['documents']:,} "
            f"documents, {fact['bytes'] / 1e6:,.1f} MB, "
            + ("cached" if built is None else f"built in {duration(built)}")
        )
    print(f"done     in {duration(time.perf_counter() - t0)}")
    return 0
