"""Export a checkpoint of any strategy as one consolidated safetensors file.

    python -m src.main export --checkpoint experiments/exp001/checkpoints/step_00000660 \\
        --out exp001.safetensors

By default the file holds the model the config built (``model:``), with its own parameter names,
so ``model.load_state_dict(safetensors.torch.load_file(path))`` works without this project;
``--task`` keeps every weight of the task (heads, teachers) under the task's names.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from src.core.errors import ArgumentParser, CheckpointError, UserError

MODEL_PREFIX = "model."


def load_consolidated(directory: Path, trust_pickles: bool = False) -> dict[str, torch.Tensor]:
    """The task's full state dict from a committed checkpoint directory of any strategy (its
    pickles checked first unless ``trust_pickles``)."""
    from src.core.checkpoint import MODEL_FILE, find_checkpoint
    from src.core.pickle_guard import verify_checkpoint
    from src.distributed.dcp_io import consolidated_model_state, has_dcp

    directory = find_checkpoint(Path(directory))
    verify_checkpoint(directory, trust=trust_pickles)
    if (directory / MODEL_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / MODEL_FILE))
    if has_dcp(directory):
        return consolidated_model_state(directory)
    from src.distributed.deepspeed import consolidated_deepspeed_state, is_deepspeed_checkpoint

    if is_deepspeed_checkpoint(directory):
        return consolidated_deepspeed_state(directory)
    raise CheckpointError(f"{directory}: no model weights found (model.safetensors, dcp/ or a "
                          "DeepSpeed checkpoint)")


def export(directory: Path, out: Path, whole_task: bool = False,
           trust_pickles: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    state = load_consolidated(directory, trust_pickles)
    if not whole_task:
        state = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"source": str(directory)})
    os.replace(tmp, out)
    return state


def export_hf(config: str, overrides: list[str], directory: Path, out: Path,
              trust_pickles: bool = False) -> None:
    """A transformers model folder (``save_pretrained``, tokenizer included) from a checkpoint of
    a ``type: hf`` model; a PEFT adapter is merged into the base weights first."""
    from src.run.experiment import build, prepare

    cfg, origins = prepare(config, overrides)
    exp = build(cfg, origins)
    from src.core.checkpoint import find_checkpoint
    from src.core.pickle_guard import verify_checkpoint

    directory = find_checkpoint(Path(directory))
    verify_checkpoint(directory, trust=trust_pickles or cfg.checkpoint.trust_pickles)
    exp.strategy.load(directory, exp.model, None)
    model = exp.task.model
    if not hasattr(model, "save_pretrained"):
        raise UserError(f"--hf: model '{cfg.model['type']}' is not a transformers model; use --out")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer = exp.data.info.extra.get("tokenizer")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m src.main export",
                                description="Write a checkpoint's weights as one safetensors file, "
                                            "or (with --config and --hf) a transformers folder.")
    p.add_argument("--checkpoint", required=True, help=(
        "a step_<N> checkpoint folder, or a run folder (its latest committed checkpoint)"))
    p.add_argument("--out", help="output .safetensors file")
    p.add_argument("--task", action="store_true",
                   help="keep every task weight (heads, teachers), not only the model")
    p.add_argument("--config", help="the run's config (needed for --hf)")
    p.add_argument("--hf", help="output folder for a merged transformers model and tokenizer")
    p.add_argument("--trust-pickles", action="store_true", help=(
        "read the checkpoint without checking its pickles (only for files you trust)"))
    p.add_argument("overrides", nargs="*", help="config overrides, as for training")
    args = p.parse_args(argv)
    if args.hf:
        if not args.config:
            raise UserError("--hf: needs --config (the run's config) to rebuild the model")
        export_hf(args.config, args.overrides, Path(args.checkpoint), Path(args.hf),
                  args.trust_pickles)
        print(f"wrote {args.hf}")
        return 0
    if not args.out:
        raise UserError("export: give --out FILE.safetensors (or --config C --hf FOLDER)")
    state = export(Path(args.checkpoint), Path(args.out), args.task, args.trust_pickles)
    n = sum(v.numel() for v in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {n:,} parameters")
    return 0
