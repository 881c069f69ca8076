"""Bad input never crashes: every shipped config and the command line, mutated by hypothesis.

Each case calls the CLI entry point in-process with ``--dry-run`` (validate and build everything,
train nothing) and checks what a user relies on: exit 0, or exit 2 with every stderr line an
``error:`` line and only a few of them; no traceback; nothing written in the working folder; and
an answer within 30 s. The mutations follow the classes of bad input seen in practice: deleted and
misspelt keys, swapped types, extreme numbers, YAML tags, aliases and nesting, bad ``base:`` and
``imports:``, malformed overrides and flags, broken bytes.

Examples are derandomized: CI runs the same cases every time. ``FUZZ_EXAMPLES=N`` scales them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
# Building these reads and tokenizes a corpus for seconds: fewer of their cases get that far.
SLOW = {"lm_stdlib.yaml", "minilm_docstrings.yaml"}
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
MAX_LINES = 10
TIME_LIMIT = 30


def _settings(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


# ------------------------------------------------------------------ hostile pieces

BOMB = (
    "&a [x, x, x, x, x, x, x, x, x]",
    "&b [*a, *a, *a, *a, *a, *a, *a, *a, *a]",
    "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b]",
    "&d [*c, *c, *c, *c, *c, *c, *c, *c, *c]",
    "&e [*d, *d, *d, *d, *d, *d, *d, *d, *d]",
    "&f [*e, *e, *e, *e, *e, *e, *e, *e, *e]",
    "&g [*f, *f, *f, *f, *f, *f, *f, *f, *f]",
    "&h [*g, *g, *g, *g, *g, *g, *g, *g, *g]",
)
BILLION_LAUGHS = "[" + ", ".join(BOMB) + "]"

HOSTILE_VALUES = [
    "!!int x",
    "!!float abc",
    "!!bool maybe",
    "!!timestamp x",
    "!!binary ###",
    "!!set {a}",
    "!!python/object:os.system x",
    "!!str",
    "!!map [1]",
    "!!seq {a: 1}",
    "!!null x",
    "9" * 5000,
    "-" + "9" * 5000,
    "1e999",
    "-1e999",
    ".nan",
    "-.inf",
    ".inf",
    "1e308",
    "0",
    "-1",
    "-0",
    "2",
    "3.5",
    "18446744073709551616",
    "-9223372036854775809",
    str(10**30),
    "[" * 3000 + "]" * 3000,
    "{a: " * 3000 + "1" + "}" * 3000,
    "[" * 60 + "]" * 60,
    "&m {type: cnn, me: *m}",
    "&l [1, *l]",
    "*undefined",
    BILLION_LAUGHS,
    '"a\\nb"',
    '"\\x00"',
    '"\\e[31mred"',
    "'" + "x" * 300 + "'",
    "x" * 5000,
    "[7]",
    "[2, 3]",
    "[-1, 2]",
    "[.nan, 0.9]",
    "{}",
    "[]",
    "null",
    "~",
    "true",
    "off",
    "yes",
    "no",
    "''",
    "{type: nope}",
    "{type: [1]}",
    "{type: cnn}",
    "[{type: x}]",
    "cuda:7",
    "nope",
    "cpu",
    "meta",
    "2026-01-01",
    "0x10",
    "0o17",
    "1_000",
    "+.5",
    ":",
    "- a",
    "? x",
    "|",
    ">",
    "%TAG",
    "@x",
    "`x`",
    "{a: 1, a: 2}",
    "[a, b",
    "{a",
    "\t1",
    "\x00",
    "\x85x",
    "\ud7ff",
    "\U0001f600",
]

MALFORMED_OVERRIDES = [
    "=5",
    "a..b=1",
    ".a=1",
    "a.=1",
    "trainer.max_steps",
    "trainer",
    "",
    " ",
    "=",
    "--trainer.max_steps=5",
    "-x",
    "--nope",
    "--config",
    "--import",
    "--list",
    "--list=nope",
    "--list=models.nope",
    "trainer.max_steps==5",
    "trainer.max_steps=5=6",
    ".".join(["a"] * 1500) + "=1",
    ".".join(["model"] * 200) + "=1",
    "x" * 5000 + "=1",
    "trainer.max_steps.x=1",
    "model.0=1",
    "callbacks.99.x=1",
    "logging.loggers.0.type=nope",
    "name=" + "n" * 300,
    "name=a/b",
    "name=..",
    "name=.hidden",
    "name=a b",
    "name=\x00",
    "logging.root=" + "r" * 5000,
    "logging.root=/proc/nope",
    "seed=-1",
    "seed=18446744073709551616",
    "optimizer.lr=-1",
    "optimizer.lr=.nan",
    "optimizer.lr=.inf",
    "optimizer.betas=[2,3]",
    "optimizer.eps=-1",
    "optimizer.weight_decay=-1",
    "optimizer.momentum=-1",
    "strategy.device=nope",
    "strategy.device=cuda:7",
    "strategy.device=cuda",
    "strategy.type=deepspeed",
    "strategy.type=fsdp",
    "strategy.type=ddp",
    "model.global_pool=3.5",
    "model.type=timm",
    "model.projector=[1000000000000000000000000000000]",
    "model.adapter.target_modules=[7]",
    "model.adapter={type: lora, target_modules: [7]}",
    "data.batch_size=0",
    "data.batch_size=" + str(10**30),
    "data.val_fraction=2",
    "data.val_fraction=-1",
    "data.num_workers=-1",
    "data.type=image_folder",
    "data.root=/nonexistent",
    "data.paths=[/etc/passwd]",
    "data.vocab_size=0",
    "trainer.max_steps=0",
    "trainer.max_epochs=-1",
    "trainer.grad_accum_steps=" + str(10**30),
    "trainer.precision=fp8",
    "checkpoint.resume=/nonexistent",
    "checkpoint.resume=",
    "checkpoint.resume=" + "r" * 5000,
    "imports=['']",
    "imports=['.rel']",
    "imports=[bad_syntax]",
    "imports=[bad_raise]",
    "imports=[nonexistent_module_xyz]",
    "imports=[os.path]",
    "imports=5",
    "callbacks=[progress]",
    "callbacks=[{type: nope}]",
    "callbacks=5",
    "scheduler.type=nope",
    "scheduler.warmup_steps=-5",
    "task.label_smoothing=2",
    "model.channels=[0]",
    "model.dropout=1.5",
    "model.channels=[-3]",
    "model.hidden=[0]",
]

FLAGS = [
    ["--trainer.max_steps=5"],
    ["--nope"],
    ["--import", ""],
    ["--import", ".rel"],
    ["--import", "bad_syntax"],
    ["--import", "bad_raise"],
    ["--import", "nonexistent_xyz"],
    ["--import", "a" * 5000],
    ["--import", "a.b.c.d"],
    ["--import", "bad_syntax.py"],
    ["--list", "nope"],
    ["--list", "models", "--import", "bad_raise"],
    ["--config"],
    ["--config", "x" * 5000],
    ["--config", "/nonexistent.yaml"],
    ["--config", "."],
    ["--config", "/dev/null"],
    ["--config", "configs"],
    ["--config", "\x00"],
    ["export"],
    ["export", "--checkpoint", "/nonexistent", "--out", "m.safetensors"],
    ["export", "--nope"],
    ["--local_rank", "x"],
    ["--dry-run"],
    [],
]

USER_MODULES = {
    "bad_syntax.py": "def broken(:\n    pass\n",
    "bad_raise.py": "import os\n\ndef _boom():\n    raise RuntimeError('boom at import')\n\n_boom()\n",
}


# ------------------------------------------------------------------ the CLI, in-process


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working folder with a copy of configs/ and two broken user modules."""
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(ROOT / "configs", folder / "configs")
    for name, text in USER_MODULES.items():
        (folder / name).write_text(text)
    return folder


def _tree(folder: Path) -> set[tuple[str, int]]:
    return {
        (str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1)
        for p in folder.rglob("*")
        if "__pycache__" not in p.parts
    }


class _Timeout(Exception):
    pass


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str, float]:
    """main(argv) in ``cwd``: (exit code, stderr, seconds); warnings print as they would."""
    from src.main import main

    def alarm(*_):
        raise _Timeout(f"no answer within {TIME_LIMIT} s")

    old_cwd, old_path = os.getcwd(), list(sys.path)
    err, out = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIME_LIMIT)
    t0 = time.perf_counter()
    try:
        os.chdir(cwd)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(out),
        ):
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(m, c, f, n, line)
            )
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse's --help / errors
                rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
        sys.path[:] = old_path
        for name in [m for m in sys.modules if m in ("bad_syntax", "bad_raise")]:
            del sys.modules[name]
    return rc, err.getvalue(), time.perf_counter() - t0


def check(argv: list[str], cwd: Path) -> None:
    """The contract for any input: exit 0, or exit 2 with a few clean error lines; no writes."""
    before = _tree(cwd)
    rc, err, seconds = run_cli(argv, cwd)
    # a token store's progress lines (a build past 10 s, on a slow machine) are not errors
    lines = [ln for ln in err.splitlines() if not ln.startswith("store    ")]
    shown = f"argv={[a[:120] for a in argv]!r}\nexit {rc}, {seconds:.1f} s, stderr:\n{err[-3000:]}"
    assert rc in (0, 2), shown
    if rc == 2:
        assert lines, shown
        assert all(line.startswith("error: ") for line in lines), shown
        assert len(lines) <= MAX_LINES, shown
        assert all(len(line) <= 600 for line in lines), shown
    assert "Traceback" not in err, shown
    assert _tree(cwd) == before, f"files written or changed: {shown}"


# ------------------------------------------------------------------ mutations


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def _leaves(data, prefix: tuple = ()) -> list[tuple]:
    """The key path of every leaf (a tuple: a key may itself hold dots, e.g. a file name)."""
    if isinstance(data, dict) and data:
        return [p for k, v in data.items() for p in _leaves(v, (*prefix, k))]
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return [p for i, v in enumerate(data) for p in _leaves(v, (*prefix, str(i)))]
    return [prefix] if prefix else []


def _misspell(draw, word: str) -> str:
    i = draw(st.integers(0, max(0, len(word) - 1)))
    how = draw(st.sampled_from(["drop", "swap", "double", "case", "dash"]))
    if how == "drop" and len(word) > 1:
        return word[:i] + word[i + 1 :]
    if how == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if how == "case":
        return word.upper()
    if how == "dash":
        return word.replace("_", "-") if "_" in word else word + "-"
    return word[:i] + word[i : i + 1] * 2 + word[i + 1 :]


# Integers are small or far beyond any allocation: a width of 10**6 is a legitimately huge model
# (slow to build, not bad input), while 2**63 must fail at once with one line.
values = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.text(max_size=40),
    st.integers(-1000, 1000).map(str),
    st.sampled_from([2**31, 2**63, 2**64, -(2**63), 10**30]).map(str),
    st.floats().map(repr),
)


@st.composite
def override_case(draw, configs=tuple(c for c in CONFIGS if c not in SLOW)):
    """A config and 1-3 overrides: a real or misspelt key, or a malformed one; hostile values."""
    name = draw(st.sampled_from(configs))
    paths = [".".join(p) for p in _leaves(_load(name))] + [
        "seed",
        "name",
        "trainer.max_steps",
        "optimizer.lr",
    ]
    overrides = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "misspelt", "malformed", "malformed"]))
        if kind == "malformed":
            overrides.append(draw(st.sampled_from(MALFORMED_OVERRIDES)))
            continue
        path = draw(st.sampled_from(paths))
        if kind == "misspelt":
            parts = path.split(".")
            j = draw(st.integers(0, len(parts) - 1))
            parts[j] = _misspell(draw, parts[j])
            path = ".".join(parts)
        overrides.append(f"{path}={draw(values)}")
    return ["--config", f"configs/{name}", *overrides, "--dry-run"]


@st.composite
def file_case(draw, configs=tuple(c for c in CONFIGS if c not in SLOW)):
    """(file text or bytes, argv): a shipped config edited the way people break YAML files."""
    name = draw(st.sampled_from(configs))
    data = _load(name)
    text = (ROOT / "configs" / name).read_text()
    how = draw(
        st.sampled_from(
            [
                "delete",
                "rename",
                "value",
                "value",
                "duplicate",
                "base",
                "imports",
                "bytes",
                "truncate",
                "bomb",
                "top",
            ]
        )
    )
    paths = _leaves(data)
    if how in ("delete", "rename", "value") and paths:
        keys = list(draw(st.sampled_from(paths)))
        node = data
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = int(keys[-1]) if isinstance(node, list) else keys[-1]
        if how == "delete":
            del node[last]
        elif how == "rename" and isinstance(node, dict):
            node[_misspell(draw, last)] = node.pop(last)
        else:
            node[last] = "__HOSTILE__"
        text = yaml.safe_dump(data, sort_keys=False)
        text = text.replace("__HOSTILE__", draw(values).replace("\n", " "))
    elif how == "duplicate":
        key = draw(st.sampled_from(list(data)))
        text += f"\n{key}: {yaml.safe_dump(data[key], default_flow_style=True).strip()}\n"
    elif how == "base":
        base = draw(
            st.sampled_from(
                [
                    "5",
                    "true",
                    "[1, 2]",
                    '"\\0x"',
                    "x" * 5000,
                    "{a: 1}",
                    "configs",
                    "/dev/null",
                    "missing.yaml",
                    "''",
                    "null",
                    "../../../../etc/passwd",
                    "c.yaml",
                    "[c.yaml, c.yaml]",
                ]
            )
        )
        text = f"base: {base}\n" + text
    elif how == "imports":
        mod = draw(
            st.sampled_from(
                [
                    "''",
                    ".rel",
                    "bad_syntax",
                    "bad_raise",
                    "5",
                    "[x]",
                    "nonexistent_xyz",
                    "os",
                    '"a\\nb"',
                    "x" * 3000,
                ]
            )
        )
        text = f"imports: [{mod}]\n" + text
    elif how == "bytes":
        raw = text.encode()
        at = draw(st.integers(0, len(raw)))
        junk = draw(
            st.sampled_from(
                [
                    b"\x00",
                    b"\xff\xfe",
                    b"\xef\xbb\xbf",
                    b"\t",
                    b"\x1b[2J",
                    b"\r",
                    b"\x85",
                    b"\xc3",
                    b"\n  bad indent: [\n",
                ]
            )
        )
        return raw[:at] + junk + raw[at:], name
    elif how == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif how == "bomb":
        text += f"\nbomb: {BILLION_LAUGHS}\n"
    else:
        text = draw(
            st.sampled_from(
                [
                    "[1, 2]",
                    "5",
                    "",
                    "---\n---\n",
                    "null",
                    "a: b: c",
                    "name: x\nname: y\n",
                    "? [a]\n: 1\n",
                    "!!set {a}",
                    "&a {b: *a}",
                    "{" * 3000,
                ]
            )
        )
    return text, name


# ------------------------------------------------------------------ the properties


@_settings(450)
@given(argv=override_case())
def test_overrides_never_crash(sandbox, argv):
    check(argv, sandbox)


@_settings(20)
@given(argv=override_case(configs=tuple(SLOW)))
def test_overrides_of_slow_configs_never_crash(sandbox, argv):
    check(argv, sandbox)


@_settings(400)
@given(case=file_case())
def test_edited_config_files_never_crash(sandbox, case):
    content, name = case
    path = sandbox / "configs" / f"fuzz_{name}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    try:
        check(["--config", str(path.relative_to(sandbox)), "--dry-run"], sandbox)
    finally:
        path.unlink()


@_settings(150)
@given(
    flags=st.lists(st.sampled_from(FLAGS), min_size=1, max_size=3),
    config=st.sampled_from([[], ["--config", "configs/exp001.yaml"]]),
)
def test_command_line_flags_never_crash(sandbox, flags, config):
    argv = config + [a for f in flags for a in f]
    if argv[:1] != ["export"] and any(f[:1] == ["export"] for f in flags):
        argv = [a for f in flags for a in f]  # a sub-command only counts first
    check(argv if "--list" in argv or argv[:1] == ["export"] else argv + ["--dry-run"], sandbox)
