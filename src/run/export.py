"""Export a trained run: ONNX, TorchScript, a torch.export program, safetensors or a transformers
folder, each checked against the PyTorch model before it is kept.

    python -m src.main export --run experiments/exp001 --format onnx --out exp001.onnx
    python -m src.main export --run experiments/exp001 --out exp001.pt2       # format from .pt2
    python -m src.main export --checkpoint experiments/exp001/checkpoints/latest --out w.safetensors
    python -m src.main export --run experiments/minilm_docstrings --format hf --out minilm-hf/

What is exported is the task's inference model (:meth:`Task.inference`): the classifier's logits,
metric learning's normalised embedding, a self-supervised backbone's features, a transformers
model's logits (a LoRA adapter merged first). Its inputs and their shapes come from the run's
data, with a dynamic batch axis (and sequence axis for token inputs). Every export is run on real
batches of the run's data at batch size 1 and 7, compared with PyTorch (rtol 1e-3, atol 1e-5;
ONNX also passes ``onnx.checker``); a failed check is an error and nothing is left at ``--out``.
The file's metadata records the model and task sections, input names, shapes and dtypes, class
names, and the run and step it came from.

safetensors holds the ``model:`` weights under their own names (``--task``: every task weight),
so ``model.load_state_dict(safetensors.torch.load_file(path))`` works without this project.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from src.core.errors import ArgumentParser, UserError
from src.data.loader import sample_batch
from src.run.inference import atomic_path, load_consolidated

MODEL_PREFIX = "model."
RTOL, ATOL = 1e-3, 1e-5
CHECK_BATCHES = (1, 7)  # batch 1 and an odd size: a specialised batch axis fails one of them
EXTENSIONS = {
    "onnx": (".onnx",),
    "torchscript": (".pt", ".ts"),
    "torch_export": (".pt2",),
    "safetensors": (".safetensors",),
    "hf": ("",),
}
FORMAT_OF = {ext: fmt for fmt, exts in EXTENSIONS.items() for ext in exts if ext}


def write_safetensors(
    state: dict[str, Any], path: Path, metadata: dict[str, str]
) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` (contiguous copies: safetensors refuses views and shared
    storage) written to ``path``; returns what was written."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}
    save_file(state, str(path), metadata=metadata)
    return state


def export(
    directory: Path, out: Path, whole_task: bool = False, trust_pickles: bool = False
) -> dict[str, torch.Tensor]:
    """The checkpoint's ``model:`` weights (``whole_task``: all) as one safetensors file, as
    they are (no model is built to check them against)."""
    state = load_consolidated(directory, trust_pickles)
    if not whole_task:
        state = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    with atomic_path(Path(out)) as tmp:
        return write_safetensors(state, tmp, {"source": str(directory)})


# ---------------------------------------------------------------------------------------------
# The inference model, its inputs, and checks


def check_batches(run) -> list[tuple[torch.Tensor, ...]]:
    """Real inputs from the run's data (validation split, else training) at each check size."""
    dataset = run.data.val if run.data.val is not None and len(run.data.val) else run.data.train
    inf = run.task.inference()
    out = []
    for n in CHECK_BATCHES:
        batch = sample_batch(dataset, n)
        out.append(tuple(t.cpu() for t in inf.inputs_of(batch)))
    return out


def signature(inf, inputs: tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    """Input names, shapes (``batch``/``sequence`` for the dynamic axes) and dtypes."""
    return [
        {
            "name": name,
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": ["batch"] + (["sequence"] if _is_tokens(t) else list(t.shape[1:])),
        }
        for name, t in zip(inf.inputs, inputs)
    ]


def _is_tokens(t: torch.Tensor) -> bool:
    return t.ndim == 2 and not t.is_floating_point()


def compare(ours: np.ndarray, reference: torch.Tensor, what: str) -> float:
    """Max absolute difference; raises if any element is off by more than atol + rtol * |ref|."""
    ref = reference.detach().float().cpu().numpy()
    ours = np.asarray(ours, dtype=np.float32)
    if ours.shape != ref.shape:
        raise UserError(
            f"export check failed: {what} returned shape {ours.shape}, PyTorch {ref.shape}"
        )
    diff = np.abs(ours - ref)
    bad = diff > ATOL + RTOL * np.abs(ref)
    if bad.any() or not np.isfinite(ours).all():
        raise UserError(
            f"export check failed: {what} differs from PyTorch by up to "
            f"{float(diff.max()):.3g} ({int(bad.sum())} of {bad.size} values beyond "
            f"rtol {RTOL}, atol {ATOL}); nothing written"
        )
    return float(diff.max()) if diff.size else 0.0


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...]):
    dyn = torch.export.Dim.DYNAMIC
    return tuple({0: dyn, 1: dyn} if _is_tokens(t) else {0: dyn} for t in inputs)


# ---------------------------------------------------------------------------------------------
# Formats: each writes ``tmp`` and returns a runner (inputs -> numpy output) and metadata


def _onnx(module, inf, inputs, tmp: Path, meta: dict) -> Any:
    import onnx
    import onnxruntime as ort

    big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5 * 2**30
    kw = dict(input_names=list(inf.inputs), output_names=[inf.output], external_data=big)
    try:
        program = torch.onnx.export(
            module, inputs, dynamo=True, dynamic_shapes=_dynamic_shapes(inputs), **kw
        )
        exporter = "dynamo"
    except Exception as exc:  # the TorchScript-based exporter still covers some models
        meta["dynamo_exporter_failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        program = None
        axes = {
            n: ({0: "batch", 1: "sequence"} if _is_tokens(t) else {0: "batch"})
            for n, t in zip(inf.inputs, inputs)
        }
        axes[inf.output] = {0: "batch"}
        torch.onnx.export(
            module, inputs, str(tmp), dynamo=False, dynamic_axes=axes, opset_version=17, **kw
        )
        exporter = "torchscript"
    if program is not None:
        program.save(str(tmp), external_data=big)
    model = onnx.load(str(tmp), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    meta.update(exporter=exporter, opset=opset)
    onnx.checker.check_model(str(tmp) if big else model)
    onnx.helper.set_model_props(
        model, {"tessera": json.dumps(meta), "class_names": json.dumps(meta.get("class_names", []))}
    )
    onnx.save(model, str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

    def run(xs):
        return session.run(None, {n: x.numpy() for n, x in zip(inf.inputs, xs)})[0]

    return run


def _torchscript(module, inf, inputs, tmp: Path, meta: dict) -> Any:
    try:
        scripted = torch.jit.trace(module, inputs, check_trace=False, strict=False)
        meta["method"] = "trace"
    except Exception as exc:
        raise UserError(
            f"--format torchscript: tracing the model failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}"
        ) from exc
    torch.jit.save(scripted, str(tmp), _extra_files={"tessera.json": json.dumps(meta)})
    loaded = torch.jit.load(str(tmp))
    return lambda xs: loaded(*xs).detach().numpy()


def _torch_export(module, inf, inputs, tmp: Path, meta: dict) -> Any:
    try:
        program = torch.export.export(module, inputs, dynamic_shapes=_dynamic_shapes(inputs))
    except Exception as exc:
        raise UserError(
            f"--format torch_export: torch.export failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}"
        ) from exc
    torch.export.save(program, str(tmp), extra_files={"tessera.json": json.dumps(meta)})
    loaded = torch.export.load(str(tmp)).module()
    return lambda xs: loaded(*xs).detach().numpy()


def _rebuilt(run) -> Any:
    """The run's task built afresh from its config (untrained weights)."""
    from src.core.seeding import seed_everything
    from src.run.experiment import build_task

    seed_everything(run.cfg.seed + 1)
    _, _, task = build_task(run.cfg, run.run_dir)
    return task.eval()


def _safetensors(run, tmp: Path, meta: dict, whole_task: bool, check: bool = True) -> Any:
    from safetensors.torch import load_file

    state = run.task.state_dict() if whole_task else run.task.model.state_dict()
    write_safetensors(state, tmp, {"tessera": json.dumps(meta), "source": str(run.checkpoint)})
    if not check:
        return None
    fresh = _rebuilt(run)
    if whole_task:
        fresh.load_state_dict(load_file(str(tmp)), strict=False)
    else:
        # The file holds the model's weights; what the inference module has beyond them
        # (metric learning's embedding layer, CLIP's projection) is the run's own, so the check
        # measures the file alone.
        rest = {k: v for k, v in run.task.state_dict().items() if not k.startswith(MODEL_PREFIX)}
        fresh.load_state_dict(rest, strict=False)
        fresh.model.load_state_dict(load_file(str(tmp)), strict=True)
    module = fresh.inference().module.eval()
    return lambda xs: module(*xs).detach().numpy()


def outside_model(task, module) -> list[str]:
    """The task's top-level parts (``embed``, ``image_proj``) whose weights ``module`` uses
    beside the ``model:`` ones: a safetensors file of the model alone does not hold them."""
    names = {id(t): n for n, t in task.state_dict(keep_vars=True).items()}
    used = {
        names[id(t)].split(".")[0]
        for t in module.state_dict(keep_vars=True).values()
        if id(t) in names
    }
    return sorted(used - {MODEL_PREFIX[:-1]})


def _hf(run, tmp: Path, meta: dict, check: bool = True) -> Any:
    from src.algorithms.base import HFOutput

    model = run.task.model
    if not hasattr(model, "save_pretrained"):
        raise UserError(
            f"--format hf: model '{run.cfg.model['type']}' is not a transformers "
            "model; use onnx, torchscript, torch_export or safetensors"
        )
    if hasattr(model, "merge_and_unload"):  # a PEFT adapter: merged into the base weights
        model = copy.deepcopy(model).merge_and_unload()
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tokenizer = run.data.info.extra.get("tokenizer")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "tessera.json").write_text(json.dumps(meta, indent=1))
    if not check:
        return None
    loaded = type(model).from_pretrained(str(tmp)).eval()
    inf = run.task.inference()
    module = (
        HFOutput(loaded, attention_mask=len(inf.inputs) > 1)
        if isinstance(inf.module, HFOutput)
        else loaded
    )
    return lambda xs: module(*xs).detach().numpy()


def export_run(run, fmt: str, out: Path, whole_task: bool = False) -> dict[str, Any]:
    """Write ``run``'s model as ``fmt`` at ``out``, checked; returns the metadata written."""
    from src.core.console import held_output

    names = list(run.data.info.class_names)
    meta: dict[str, Any] = {"format": fmt, **run.provenance(), "class_names": names}
    checked = True
    try:
        inf = run.task.inference()
    except UserError:
        if fmt not in ("safetensors", "hf"):
            raise
        inf, checked = None, False
    if inf is not None:
        reference = inf.module.eval()
        if fmt in ("onnx", "torchscript", "torch_export") and hasattr(
            run.task.model, "merge_and_unload"
        ):
            merged = copy.deepcopy(run.task)  # the adapter merged into a copy of the weights
            merged.model = merged.model.merge_and_unload()
            meta["adapter"] = "merged"
            inf = merged.inference()
        module = inf.module.eval()
        batches = check_batches(run)
        meta.update(inputs=signature(inf, batches[-1]), output=inf.output)
        if fmt == "safetensors" and not whole_task:
            meta["outside_model"] = outside_model(run.task, module)
    held = held_output()  # exporters print pages of progress and warnings: a log, not the console
    try:
        with atomic_path(out) as tmp, torch.no_grad():
            if fmt == "onnx":
                runner = _onnx(module, inf, batches[-1], tmp, meta)
            elif fmt == "torchscript":
                runner = _torchscript(module, inf, batches[-1], tmp, meta)
            elif fmt == "torch_export":
                runner = _torch_export(module, inf, batches[-1], tmp, meta)
            elif fmt == "safetensors":
                runner = _safetensors(run, tmp, meta, whole_task, checked)
            else:
                runner = _hf(run, tmp, meta, checked)
            diffs = []
            for xs in batches if checked else []:
                diffs.append(compare(runner(xs), reference(*xs), f"{fmt} at batch {len(xs[0])}"))
            meta["max_abs_diff"] = max(diffs) if diffs else None
    except UserError:
        held.release("drop")
        raise
    except Exception as exc:
        held.release("drop")
        raise UserError(
            f"export --format {fmt}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        ) from exc
    held.release("drop")
    return meta


def export_hf(
    config: str, overrides: list[str], directory: Path, out: Path, trust_pickles: bool = False
) -> dict[str, Any]:
    """A transformers folder (adapter merged, tokenizer included) from a checkpoint, checked."""
    from src.run.inference import load_run

    run = load_run(
        checkpoint=str(directory),
        config=config,
        overrides=list(overrides),
        trust_pickles=trust_pickles,
    )
    return export_run(run, "hf", Path(out))


def format_of(fmt: Optional[str], out: Optional[Path]) -> str:
    """The format asked for, checked against ``--out``'s extension (or taken from it)."""
    suffix = out.suffix.lower() if out is not None else None
    if fmt is None:
        if suffix is None:
            return "safetensors"
        if suffix in FORMAT_OF:
            return FORMAT_OF[suffix]
        if suffix == "":
            return "hf"
        raise UserError(
            f"--out: {out}: unknown extension {suffix!r}; give --format "
            f"({', '.join(EXTENSIONS)}) or one of {', '.join(FORMAT_OF)}"
        )
    if suffix is not None and suffix not in EXTENSIONS[fmt]:
        want = " or ".join(EXTENSIONS[fmt]) if fmt != "hf" else "a folder name (no extension)"
        raise UserError(f"--out: {out}: --format {fmt} writes {want}")
    return fmt


def main(argv: list[str]) -> int:
    from src.run.inference import load_run, locate, positional_run

    p = ArgumentParser(
        prog="python -m src.main export",
        description="Export a trained run as ONNX, TorchScript, torch.export, "
        "safetensors or a transformers folder, checked against "
        "PyTorch before it is kept.",
    )
    p.add_argument("--run", help="the run folder (its latest committed checkpoint)")
    p.add_argument(
        "--checkpoint", help="a step folder, checkpoints/, checkpoints/latest or a run folder"
    )
    p.add_argument(
        "--format",
        choices=list(EXTENSIONS),
        help="default: from --out's extension (.onnx .pt .pt2 .safetensors; a folder "
        "for hf), else safetensors",
    )
    p.add_argument("--out", help="output file (folder for hf); default RUN/export/model.<ext>")
    p.add_argument(
        "--task",
        action="store_true",
        help="safetensors: keep every task weight (heads, teachers), not only the model",
    )
    p.add_argument("--config", help="the config to build the model from (default: the run's)")
    p.add_argument("--hf", metavar="FOLDER", help="same as --format hf --out FOLDER")
    p.add_argument(
        "--trust-pickles",
        action="store_true",
        help=("read the checkpoint without checking its pickles (only for files you trust)"),
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="[RUN] key.path=value",
        help="the run folder may also come first without --run; then config "
        "overrides, as for training",
    )
    args = p.parse_args(argv)
    args.run = positional_run(args, p.prog)
    if args.hf:
        if args.out or args.format not in (None, "hf"):
            raise UserError("--hf FOLDER: same as --format hf --out FOLDER; give one of them")
        args.format, args.out = "hf", args.hf
    out = Path(args.out) if args.out else None
    fmt = format_of(args.format, out)
    if args.task and fmt != "safetensors":
        raise UserError("--task: only with --format safetensors")
    step_dir, run_dir, config = locate(args.run, args.checkpoint, args.config)
    if out is None:
        if run_dir is None:
            raise UserError("--out: needed when the checkpoint is not inside a run folder")
        out = run_dir / "export" / ("model" + EXTENSIONS[fmt][0] if fmt != "hf" else "hf")
    if config is None:  # a bare checkpoint: its weights, as they are (nothing to check against)
        if fmt != "safetensors":
            raise UserError(
                f"--format {fmt}: needs the run's config to build the model: give --run or --config"
            )
        state = export(step_dir, out, args.task, args.trust_pickles)
        n = sum(v.numel() for v in state.values())
        print(f"wrote {out}: {len(state)} tensors, {n:,} parameters (not checked: no config)")
        return 0
    run = load_run(
        str(run_dir) if run_dir else None,
        str(step_dir),
        args.config,
        args.overrides,
        args.trust_pickles,
    )
    meta = export_run(run, fmt, out, args.task)
    diff = meta.get("max_abs_diff")
    checked = (
        f"checked against PyTorch at batch {' and '.join(map(str, CHECK_BATCHES))}: max "
        f"abs diff {diff:.2e}"
        if diff is not None
        else "not checked: the task has no inference model"
    )
    extra = f", {meta['exporter']} exporter, opset {meta['opset']}" if fmt == "onnx" else ""
    print(f"wrote {out} ({fmt}, step {run.step}{extra}); {checked}")
    if meta.get("outside_model"):
        print(
            f"note: the {meta['output']} also uses the task's {', '.join(meta['outside_model'])}"
            ", which the file does not hold; --task keeps every task weight"
        )
    return 0
