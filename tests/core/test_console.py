"""The console says what happens: a banner, one line per log, a summary; libraries go to log.txt."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

from src.main import main

NOISY = textwrap.dedent('''
    import logging, os, signal, warnings
    from src.core.callbacks.base import Callback
    from src.core.registry import CALLBACKS


    @CALLBACKS.register("noisy")
    class Noisy(Callback):
        """Talks like a library at the first step; SIGTERMs itself at step ``stop_at``."""

        def __init__(self, stop_at: int = 0):
            self.stop_at = stop_at

        def on_step_end(self, trainer, outputs):
            if trainer.step == 1:
                warnings.warn("this API will change in v9", FutureWarning)
                logging.getLogger("transformers").warning("Some weights were not initialized")
            if trainer.step == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
''')


@pytest.fixture
def noisy(tmp_path, monkeypatch):
    (tmp_path / "noisy_plugin.py").write_text(NOISY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "noisy_plugin"
    from src.core.registry import CALLBACKS

    CALLBACKS._entries.pop("noisy", None)
    sys.modules.pop("noisy_plugin", None)


def test_banner_lines_summary_and_quiet_libraries(write_config, tmp_path, capsys, noisy):
    cfg = write_config(
        {"imports": [noisy], "callbacks": [{"type": "noisy"}], "trainer.eval_every_n_steps": 10}
    )
    lib = logging.getLogger("transformers")
    before = (list(lib.handlers), lib.propagate, lib.level)
    assert main(["--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    run_dir = tmp_path / "runs/tiny"
    assert f"run      {run_dir} (new run)" in out
    assert "model    mlp: 2,410 parameters (2,410 trainable)" in out
    assert "compute  single on cpu, world size 1, fp32, 20 steps" in out
    assert "done     step 20 of 20 in" in out and "final val/loss" in out
    assert f"saved    {run_dir}/checkpoints/step_00000020" in out
    assert (
        f"predict --run {run_dir}; export: python -m src.main export --run {run_dir} "
        "--out tiny.onnx" in out
    )
    # the library's warning and log record are in the run's log, not on the console
    assert "v9" not in out + err and "not initialized" not in out + err
    log = (run_dir / "log.txt").read_text()
    assert "FutureWarning: this API will change in v9" in log
    assert "transformers WARNING Some weights were not initialized" in log
    assert (list(lib.handlers), lib.propagate, lib.level) == before  # restored after the run


def test_own_warnings_are_one_line_without_a_source_location(write_config, capsys):
    cfg = write_config({"optimizer.lr": 1e30, "trainer.max_bad_steps": 2})  # diverges at once
    main(["--config", str(cfg)])
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warned and all("non-finite" in w for w in warned), err
    assert ".py:" not in err


def test_sigterm_says_where_it_saved_and_how_to_resume(write_config, tmp_path, capsys, noisy):
    cfg = write_config({"imports": [noisy], "callbacks": [{"type": "noisy", "stop_at": 7}]})
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(cfg)])
    assert stop.value.code == 128 + 15
    out = capsys.readouterr().out
    # sent after step 7, acted on by every rank at the end of the next step
    assert (
        f"stopped by SIGTERM at step 8; saved {tmp_path}/runs/tiny/checkpoints/step_00000008;"
        " run the same command again to resume"
    ) in out


def test_val_lines_carry_the_epoch_of_their_step(write_config, tmp_path):
    from helpers import metrics, run

    run(
        write_config(
            {"trainer.max_steps": 90, "trainer.eval_every_n_epochs": 1, "trainer.log_every": 44}
        )
    )  # 44 steps per epoch
    rows = {(r["step"], "val/loss" in r): r["epoch"] for r in metrics(tmp_path / "runs/tiny")}
    assert rows[(44, True)] == rows[(44, False)] == 0 and rows[(88, True)] == 1


def test_bare_callback_names_and_the_progress_alias(write_config, tmp_path):
    from helpers import run

    from src.core.callbacks.progress import RichProgressBar

    exp = run(write_config({"callbacks": ["progress"]}))
    assert any(isinstance(cb, RichProgressBar) for cb in exp.trainer.callbacks)
