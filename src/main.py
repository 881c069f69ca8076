"""Command line: ``python -m src.main --config configs/exp001.yaml [key.path=value ...]``.

    python -m src.main --config configs/exp001.yaml                      # train
    python -m src.main --config configs/exp001.yaml trainer.max_steps=50 name=exp001-quick
    python -m src.main --config configs/exp001.yaml --dry-run            # build, report, no training
    python -m src.main --config configs/exp001.yaml optimizer.lr=1e-3 --new-run  # exp001-2/
    python -m src.main --list [REGISTRY[.NAME]]                          # components, parameters
    python -m src.main --import my_pkg.my_module --config my.yaml        # user components
    python -m src.main predict --run experiments/exp001                  # predictions (JSONL)
    python -m src.main export --run experiments/exp001 --out exp001.onnx # onnx, .pt, .pt2, ...
    python -m src.main sweep --config configs/sweep_exp001.yaml          # hyper-parameter search
    python -m src.main prepare --config configs/lm_stdlib.yaml           # tokenize, no training
    python -m src.main pack --from images/ --out shards/                 # WebDataset tar shards
    python -m src.main submit --config configs/exp001.yaml               # a SLURM job

Bad input (config, data, checkpoint, command line) prints one line per problem and exits with 2.
Heavy libraries are imported only once a config is being built, so --help and --list are instant.
"""

from __future__ import annotations

import argparse
import sys

MAX_ERROR_LINES = 10
# A rank other than 0 that finds the config at fault leaves the printing to rank 0 and waits this
# long before it exits: a launcher stops every rank as soon as one exits, and leaving first could
# stop rank 0 before it has printed the line (rank 0 exits first, and the launcher ends the wait).
QUIET_RANK_GRACE_S = 10.0


def _error_line(line: str) -> None:
    """``error: LINE`` on stderr in one write: the ranks of a run share one stderr, and a line
    written in two parts (print writes the text, then the newline) can be split by another's."""
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def _parser() -> argparse.ArgumentParser:
    from src.core.errors import ArgumentParser

    p = ArgumentParser(
        prog="python -m src.main",
        description="Train an experiment described by one YAML file.",
        epilog="Overrides: dotted paths with YAML values, e.g. trainer.max_steps=50 "
        "model.hidden=[256,256]. They win over the file, which wins over defaults. "
        "Other commands (each with --help): predict, export, sweep, prepare, pack, submit.",
    )
    p.add_argument("--config", "-c", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and build everything, print sizes and step counts, do not train",
    )
    p.add_argument(
        "--new-run",
        action="store_true",
        help="train in a new folder <name>-2, -3, ... when experiments/<name> is taken",
    )
    p.add_argument(
        "--list",
        nargs="?",
        const="all",
        metavar="REGISTRY[.NAME]",
        help="list registered components (all, one registry), or one's parameters",
    )
    p.add_imports()
    p.add_argument(
        "--traceback",
        action="store_true",
        help="with an error, also print the traceback of where it was raised (any command)",
    )
    # The deepspeed launcher passes --local_rank; the same value is in the LOCAL_RANK variable.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def _list(which: str, imports: list[str]) -> int:
    """``--list``, ``--list REGISTRY`` or ``--list REGISTRY.NAME`` (that component's parameters)."""
    import difflib

    from src.core.errors import ConfigError
    from src.core.registry import ALL
    from src.run.catalog import builtin_names, summary

    reg_name, _, component = which.partition(".")
    if reg_name != "all" and reg_name not in ALL:
        close = difflib.get_close_matches(reg_name, list(ALL), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"--list: unknown registry '{reg_name}'{hint} (available: {', '.join(ALL)})"
        )
    names = builtin_names()
    if imports:  # user modules register at import; show them too, with their docstrings
        from src.run.plugins import import_user_modules

        import_user_modules(imports, "--import")
        for r_name, reg in ALL.items():
            for n in reg.names():
                names[r_name].setdefault(n, summary(reg.get(n).__doc__ or ""))
    if component:
        return _list_component(reg_name, component)
    for r_name, reg in ALL.items():
        if which not in ("all", r_name) or not names[r_name]:
            continue
        print(f"{r_name}: {reg.doc}")
        for n, doc in sorted(names[r_name].items()):
            print(f"  {n:<22} {doc}".rstrip())
    if which == "all":
        print("\n--list REGISTRY.NAME shows one component's parameters (e.g. --list models.cnn)")
    return 0


def _list_component(reg_name: str, name: str) -> int:
    from src.core.registry import ALL
    from src.run.catalog import entry_doc, load_builtins, parameters, summary

    load_builtins()
    reg = ALL[reg_name]
    entry = reg.get(name, f"--list {reg_name}.{name}")
    doc = entry_doc(entry)
    print(f"{reg.singular} {name}: {summary(doc)}")
    rows = parameters(entry, doc, reg.injected, reg.field_types(name))
    if not rows:
        print("  (no parameters)")
    widths = [max([len(r[i]) for r in rows] + [0]) for i in range(3)]
    for pname, kind, default, text in rows:
        print(
            f"  {pname:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {text}".rstrip()
        )
    if reg.injected:
        print(f"  (set by the platform: {', '.join(sorted(reg.injected))})")
    return 0


def _dry_run(exp) -> None:
    s = exp.summary()
    print(f"experiment      {exp.cfg.name}")
    print(
        f"model           {exp.cfg.model['type']}: {s['model_parameters']:,} parameters "
        f"({s['trainable_parameters']:,} trainable)"
    )
    print(
        f"data            {exp.cfg.data.type}: {s['train_samples']:,} train, "
        f"{s['val_samples']:,} val samples; input {tuple(exp.data.info.input_shape)}, "
        f"{exp.data.info.num_classes} classes"
    )
    print(
        f"steps/epoch     {s['steps_per_epoch']} (batch {exp.cfg.data.batch_size} x "
        f"accumulation {exp.cfg.trainer.grad_accum_steps})"
    )
    print(f"total steps     {s['total_steps']}")
    print(
        f"strategy        {exp.cfg.strategy['type']} on {exp.strategy.device}, "
        f"world size {exp.strategy.world_size}"
    )
    from src.core.model_summary import format_summary, summarize
    from src.core.param_groups import format_table

    print("\n" + "\n".join(format_summary(*summarize(exp.task))))
    print("\n" + "\n".join(format_table(exp.param_groups)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from src.core.errors import UserError

    show_traceback = "--traceback" in argv  # for every command, so taken out before parsing
    argv = [a for a in argv if a != "--traceback"]

    from src.core.console import quiet_libraries

    try:
        with quiet_libraries():
            return _dispatch(argv)
    except BrokenPipeError:  # `... --list | head`: the reader left, nothing to report
        sys.stderr = None
        return 0
    except UserError as exc:
        if getattr(exc, "quiet", False):
            import time

            time.sleep(getattr(exc, "linger_s", 0.0))
            return exc.exit_code
        lines = exc.lines or ["(no message)"]
        if len(lines) > MAX_ERROR_LINES:
            lines = lines[: MAX_ERROR_LINES - 1] + [
                f"... and {len(lines) - MAX_ERROR_LINES + 1} more problems"
            ]
        if show_traceback:
            import traceback

            traceback.print_exception(getattr(exc, "origin", None) or exc, file=sys.stderr)
        for line in lines:
            _error_line(line)
        return exc.exit_code


def _prepare_and_build(args):
    """Validate and build the experiment; what libraries print meanwhile is held back: dropped
    if the config is at fault (the error is then the only output), else shown (--dry-run) or
    written to the run's log.txt (training)."""
    from src.core.console import held_output
    from src.core.errors import UserError
    from src.run.experiment import build, prepare

    held = held_output()
    outcome = "drop"
    try:
        cfg, origins = prepare(args.config, args.overrides, args.imports)
        if args.new_run:
            from pathlib import Path

            from src.run.record import free_name

            cfg.name = free_name(Path(cfg.logging.root), cfg.name)
            origins["name"] = "override '--new-run'"
        exp = build(cfg, origins)
        outcome = "console" if args.dry_run else "log"
        return exp
    except UserError as exc:
        import os

        from src.run.sweep_config import looks_like_sweep

        err = exc
        if args.config and looks_like_sweep(args.config):
            err = UserError(
                f"{args.config}: is a sweep file; run it with python -m src.main "
                f"sweep --config {args.config}"
            )
        # every rank of a launcher reads the same config: rank 0 alone reports what is wrong
        err.quiet = os.environ.get("RANK", "0") != "0"
        err.linger_s = QUIET_RANK_GRACE_S if err.quiet else 0.0
        raise err from None
    except BaseException:
        outcome = "console"  # not the config's fault: keep whatever was printed, with the traceback
        raise
    finally:
        held.release(outcome)


def _build_stoppable(args, slurm):
    """Build the experiment; SIGTERM meanwhile (a preempted job starting) stops it at once with
    128 + 15, and requeues a SLURM job that submit wrote, as a stop during training does."""
    import signal
    import threading

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        return _prepare_and_build(args)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return _prepare_and_build(args)
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            print("stopped by SIGTERM while starting; nothing to save", file=sys.stderr, flush=True)
            slurm.requeue_after_stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


COMMANDS = ("predict", "export", "sweep", "prepare", "pack", "submit")


def _check_command(argv: list[str]) -> None:
    """A first word that is no override, flag or file but close to a command: say which."""
    import difflib
    import os

    first = argv[0] if argv else ""
    if not first or first.startswith("-") or "=" in first or os.path.exists(first):
        return
    close = difflib.get_close_matches(first, COMMANDS, n=1, cutoff=0.6)
    if close:
        from src.core.errors import UserError

        raise UserError(
            f"{first}: not a command; did you mean '{close[0]}'? (commands: {', '.join(COMMANDS)})"
        )


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["export"]:
        from src.run import export

        return export.main(argv[1:])
    if argv[:1] == ["predict"]:
        from src.run import predict

        return predict.main(argv[1:])
    if argv[:1] == ["prepare"]:
        from src.run import prepare_data

        return prepare_data.main(argv[1:])
    if argv[:1] == ["submit"]:
        from src.run import slurm

        return slurm.main(argv[1:])
    if argv[:1] == ["pack"]:
        from src.run import pack

        return pack.main(argv[1:])
    if argv[:1] == ["sweep"]:
        from src.run import sweep

        return sweep.main(argv[1:])
    _check_command(argv)
    args = _parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    if args.list:
        return _list(args.list, args.imports)
    if not args.config:
        from src.core.errors import UserError

        raise UserError("--config: required (or use --list / --help)")
    import os

    from src.core.errors import CheckpointSaveError
    from src.core.trainer import TrainingDiverged
    from src.distributed.launch import slurm_env

    os.environ.update(slurm_env())  # `srun python -m src.main` with several tasks: their ranks
    from src.run import slurm

    exp = _build_stoppable(args, slurm)
    if args.dry_run:
        _dry_run(exp)
        return 0
    strategy = exp.strategy
    in_step = False  # every rank got here alike: the group can be left together
    banner = slurm.banner() if strategy.is_main else None
    if banner:
        print(f"slurm    {banner}", flush=True)
    try:
        exp.run()
        in_step = True
    except SystemExit as exc:  # stopped by a signal, checkpoint committed
        in_step = True
        if exc.code == 128 + 15:  # SIGTERM: a time limit or a preemption under SLURM
            slurm.requeue_after_stop()
        raise
    except TrainingDiverged as exc:  # decided on values all ranks agree on
        in_step = True
        _error_line(str(exc))
        return 1
    except CheckpointSaveError as exc:
        if exc.every_rank:  # each rank says it before any leaves: a launcher stops the other
            in_step = True  # processes as soon as one exits, maybe before they have printed
            for line in exc.lines:
                _error_line(line)
            exc.quiet = True
        raise
    except RuntimeError as exc:
        line = strategy.describe_failure(exc)
        if line is None:
            raise
        _error_line(line)
        return 1
    finally:
        del exp  # the wrapped model holds the process group: free it before the group goes
        strategy.teardown(in_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
