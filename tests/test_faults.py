"""Faults and bad input against the trainer and the evaluation: nothing lost, nothing blessed that
is bad, one line for every mistake a user can make.

Each bad input asserts the one-line message and the exit status; each fault asserts what is on
disk afterwards.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import REPO, restore_params, subprocess_env, tiny_config, trainer_command

from bt_jax import checkpoint, divergence, metric_logging
from bt_jax import config as config_lib
from bt_jax import workdir as workdir_lib
from bt_jax.train import loop


def run_cli(args, *, cwd=REPO, devices=8, timeout=300, **env):
    return subprocess.run(
        args,
        cwd=cwd,
        env=subprocess_env(devices, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result, pattern, status=1):
    """The command failed with ``status`` and its last stderr line is ``error: ...pattern...``,
    with no traceback anywhere."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert re.search(pattern, lines[-1]), lines[-1]


def train_cli(workdir, *flags, **overrides):
    return trainer_command(workdir, **overrides) + list(flags)


# ---------------------------------------------------------------------------------------------
# Divergence.


def test_divergence_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "diverged")
    # An absurd learning rate: LARS scales each weight update to 1.25e5x the weight's norm, so
    # the weights pass the divergence bound (1e18) at step 3, with steps 1 and 2 saved.
    config = tiny_config(
        max_steps=30,
        batch_size=32,
        num_epochs=1,
        optim__warmup_epochs=0,
        checkpoint__every_steps=1,
        checkpoint__keep=1,
        logging__every_steps=1,
        optim__learning_rate_weights=1e9,
        eval__at_end=False,
    )
    with pytest.raises(divergence.DivergenceError, match=r"step \d+") as error:
        loop.train_and_evaluate(config, workdir)
    message = str(error.value)
    params, step = restore_params(workdir)
    assert step >= 2 and f"checkpoint (step {step}) is intact" in message
    assert all(np.all(np.isfinite(x)) for x in __import__("jax").tree.leaves(params))
    largest = max(float(np.max(np.abs(x))) for x in __import__("jax").tree.leaves(params))
    assert largest < divergence.DIVERGED_MAGNITUDE
    assert not os.path.exists(os.path.join(workdir, checkpoint.BACKBONE_FILE))


def test_the_collapse_signature_and_huge_states_are_divergence():
    last_good = lambda: "the last good checkpoint (step 3) is intact"  # noqa: E731
    with pytest.raises(divergence.DivergenceError, match="constant over the batch at step 7"):
        divergence.check_metrics(
            7, {"loss": 512.0, "invariance": 512.0, "redundancy": 0.0}, 512, last_good
        )
    divergence.check_metrics(
        7, {"loss": 500.0, "invariance": 499.0, "redundancy": 3.0}, 512, last_good
    )
    with pytest.raises(divergence.DivergenceError, match="largest magnitude 1e\\+19"):
        divergence.check_state(9, 1e19, last_good)
    with pytest.raises(divergence.DivergenceError, match="not finite"):
        divergence.check_state(9, float("inf"), last_good)


def test_evaluation_refuses_a_checkpoint_with_non_finite_values(tmp_path):
    from bt_jax import evaluate

    workdir = str(tmp_path / "nan")
    loop.train_and_evaluate(tiny_config(max_steps=1, batch_size=32, eval__at_end=False), workdir)
    config = workdir_lib.read_config(workdir)
    variables = checkpoint.read_variables(workdir, 1, part=None)
    variables["params"]["backbone"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
    manager = checkpoint.open_manager(workdir, keep=5)
    checkpoint.save(
        manager,
        2,
        {"params": variables["params"], "batch_stats": variables["batch_stats"]},
        config_lib.resume_identity(config),
    )
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(checkpoint.CheckpointError, match="non-finite.*conv1/kernel.*--step"):
        evaluate.evaluate(workdir, "knn", baselines=False, write=False)


# ---------------------------------------------------------------------------------------------
# Nothing written before everything is checked; the run's identity; one writer.


def test_a_failed_start_writes_nothing_and_the_corrected_command_runs(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(train_cli(workdir, batch_size=4096))
    assert_one_line_error(result, r"config.batch_size=4096: larger than the 1500 training")
    assert not workdir.exists() or not any(workdir.iterdir())
    with pytest.raises(config_lib.ConfigError, match="eval_resize"):
        loop.train_and_evaluate(tiny_config(data__eval_resize=8), str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir())
    loop.train_and_evaluate(
        tiny_config(max_steps=1, batch_size=32, eval__at_end=False), str(workdir)
    )
    assert (workdir / "checkpoints" / "1").is_dir()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Two checkpoints (steps 1 and 2) of a tiny run, no end-of-run evaluation."""
    workdir = tmp_path_factory.mktemp("small") / "run"
    loop.train_and_evaluate(
        tiny_config(max_steps=2, batch_size=32, checkpoint__every_steps=1, eval__at_end=False),
        str(workdir),
    )
    return workdir


def copy_of(run, tmp_path, name="copy"):
    destination = tmp_path / name
    shutil.copytree(run, destination)
    return destination


def test_a_changed_run_is_refused_by_the_checkpoint_itself_without_config_json(small_run, tmp_path):
    workdir = copy_of(small_run, tmp_path)
    (workdir / "config.json").unlink()
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(
        checkpoint.IncompatibleCheckpointError,
        match="checkpoints/2 holds a run with another config.*batch_size: saved 32, given 64",
    ):
        loop.train_and_evaluate(
            tiny_config(max_steps=3, batch_size=64, checkpoint__every_steps=1), str(workdir)
        )
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    # Turning the online probe off changes the state's shape: refused the same way.
    with pytest.raises(
        checkpoint.IncompatibleCheckpointError, match="probe.enabled: saved True, given False"
    ):
        loop.train_and_evaluate(
            tiny_config(
                max_steps=3, batch_size=32, probe__enabled=False, checkpoint__every_steps=1
            ),
            str(workdir),
        )


def test_a_truncated_config_json_is_one_line_naming_it(small_run, tmp_path):
    workdir = copy_of(small_run, tmp_path)
    text = (workdir / "config.json").read_text()
    (workdir / "config.json").write_text(text[: len(text) // 2])
    result = run_cli(train_cli(workdir, max_steps=3, batch_size=32, checkpoint__every_steps=1))
    assert_one_line_error(result, r"config.json is not valid JSON.*truncated")


def test_a_second_run_on_a_live_workdir_is_refused(small_run, tmp_path):
    workdir = copy_of(small_run, tmp_path)
    lease = workdir_lib.Lease(workdir)
    lease.owner["pid"] = os.getppid()  # a live process on this host holds it
    lease._write()
    result = run_cli(train_cli(workdir, max_steps=3, batch_size=32, checkpoint__every_steps=1))
    assert_one_line_error(result, rf"in use by another run .*pid {os.getppid()}.*delete .*lock")
    # A lease whose process is dead is stale: the run takes it over and resumes.
    lease.owner["pid"] = 2**22 + 12345
    lease._write()
    loop.train_and_evaluate(
        tiny_config(max_steps=3, batch_size=32, checkpoint__every_steps=1, eval__at_end=False),
        str(workdir),
    )
    assert (workdir / "checkpoints" / "3").is_dir()
    assert not (workdir / workdir_lib.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Corrupt checkpoints.


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(small_run, tmp_path):
    workdir = copy_of(small_run, tmp_path)
    # Truncate every file of the latest checkpoint's state: a copy or a write cut short.
    for path in (workdir / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 1:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    state = loop.train_and_evaluate(
        tiny_config(max_steps=3, batch_size=32, checkpoint__every_steps=1, eval__at_end=False),
        str(workdir),
    )
    assert int(state.step) == 3
    assert (workdir / checkpoint.UNREADABLE / "2").is_dir()  # set aside, not deleted
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "3",
    ]
    # Steps 2 and 3 were recomputed from step 1; each is logged once.
    steps = [r["step"] for r in metric_logging.read_metrics(workdir) if "loss" in r]
    assert steps == sorted(set(steps))


def test_when_no_checkpoint_restores_it_says_so_in_one_line(small_run, tmp_path):
    workdir = copy_of(small_run, tmp_path)
    for step in ("1", "2"):
        shutil.rmtree(workdir / "checkpoints" / step / "state")
        (workdir / "checkpoints" / step / "state").mkdir()
    result = run_cli(train_cli(workdir, max_steps=3, batch_size=32, checkpoint__every_steps=1))
    assert_one_line_error(result, r"No checkpoint in .* restores \(step 2: .*; step 1: .*\)")


# ---------------------------------------------------------------------------------------------
# Interrupts.


def wait_for(predicate, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not predicate():
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()[-3000:]


@pytest.mark.parametrize("delay", [0.5, 4.0, 9.0])
def test_ctrl_c_during_start_up_is_one_line_never_a_crash(tmp_path, delay):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        train_cli(workdir),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 130), stderr[-3000:]  # 0: it had already finished
    assert "Traceback" not in stderr and "Segmentation" not in stderr
    if process.returncode == 130:  # during start-up, or (a warm compilation cache) in training
        last = stderr.strip().splitlines()[-1]
        assert re.search(r"stopped by SIGINT during|Stopped by a signal at step \d+", last), last
    assert not (workdir / workdir_lib.LOCK_FILE).exists()


def test_ctrl_c_during_the_end_of_run_evaluation_stops_and_can_be_rerun(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        train_cli(workdir, max_steps=2),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (workdir / checkpoint.MODEL_FILE).exists(), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "during the end-of-run evaluation" in last and "python -m bt_jax.evaluate" in last
    assert "Traceback" not in stderr
    assert (workdir / "checkpoints" / "2").is_dir()
    assert not (workdir / workdir_lib.LOCK_FILE).exists()
    result = run_cli(
        [
            sys.executable,
            "-m",
            "bt_jax.evaluate",
            f"--workdir={workdir}",
            "--protocol=logreg",
            "--baselines=false",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workdir / "eval_logreg.json").read_text())["step"] == 2


# ---------------------------------------------------------------------------------------------
# Bad input: one line each.


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--config.no_such_key=1"], r"no_such_key"),
        (["--config.model.widht=8"], r"widht"),
        (["--config=/nonexistent/recipe.py"], r"/nonexistent/recipe.py"),
        (["--config.optim.learning_rate_weights=-0.2"], r"learning_rate_weights=-0.2.*> 0"),
        (["--config.optim.learning_rate_weights=nan"], r"learning_rate_weights=nan"),
        (["--config.optim.learning_rate_weights=0"], r"learning_rate_weights=0.0.*> 0"),
        (["--config.data.dataset=idx", "--config.data.data_dir=/nonexistent"], r"/nonexistent"),
        (["--config.data.dataset=folder", "--config.data.data_dir=/nonexistent"], r"/nonexistent"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, flags, pattern):
    workdir = tmp_path / "run"
    result = run_cli([sys.executable, "-m", "bt_jax.train", f"--workdir={workdir}", *flags])
    assert result.returncode in (1, 2)
    assert_one_line_error(result, pattern, status=result.returncode)
    assert not workdir.exists()


def test_a_broken_config_file_is_one_line(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("def get_config(:\n    pass\n")
    result = run_cli(
        [
            sys.executable,
            "-m",
            "bt_jax.train",
            f"--workdir={tmp_path / 'run'}",
            f"--config={recipe}",
        ]
    )
    assert_one_line_error(result, r"recipe.py", status=2)


@pytest.mark.parametrize("layout", ["file", "under_a_file", "unwritable", "checkpoints_file"])
def test_an_unusable_workdir_is_one_line_before_any_compute(tmp_path, layout):
    if layout == "file":
        workdir = tmp_path / "a_file"
        workdir.write_text("x")
        pattern = r"is a file, not a directory"
    elif layout == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        workdir = tmp_path / "a_file" / "run"
        pattern = r"a_file/run"
    elif layout == "unwritable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere: an unwritable directory needs another user")
        workdir = tmp_path / "readonly"
        workdir.mkdir()
        workdir.chmod(0o500)
        pattern = r"not writable"
    else:
        workdir = tmp_path / "run"
        workdir.mkdir()
        (workdir / "checkpoints").write_text("x")
        pattern = r"checkpoints"
    start = time.time()
    command = train_cli(workdir)
    result = run_cli([command[0], "-X", "importtime", *command[1:]])
    assert_one_line_error(result, pattern)
    assert time.time() - start < 120
    # What takes no write to find is found before TensorFlow loads.
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "bt_jax.workdir" in imported, result.stderr[-2000:]
    assert ("tensorflow" in imported) == (layout == "unwritable")


def test_disk_full_is_one_line_naming_the_last_complete_checkpoint(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        result = run_cli(
            train_cli(
                mount / "run",
                max_steps=40,
                batch_size=32,
                checkpoint__every_steps=1,
                checkpoint__keep=40,
            )
        )
        assert_one_line_error(
            result,
            r"(No space left on device|Saving the checkpoint).*"
            r"(last complete checkpoint is step \d+|no checkpoint is "
            r"complete)",
        )
        assert len(result.stderr.splitlines()) < 40
    finally:
        subprocess.run(["umount", "-l", str(mount)])


# The disk-full run above shows this only when a write is still pending as orbax closes its
# event loop (a race); here the same tensorstore callback fails every time.
LATE_STORAGE_CALLBACKS = """
import asyncio
import tensorstore as ts
from bt_jax import cli

def main():
    for _ in range(50):
        promise, pending_write = ts.Promise.new()
        loop = asyncio.new_event_loop()

        async def wait():
            await pending_write

        loop.create_task(wait())
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        promise.set_result(None)  # its callback calls the closed loop: RuntimeError
    raise OSError(28, "No space left on device")

cli.run(main)
"""


def test_late_storage_callbacks_after_a_failed_save_are_one_warning_not_tracebacks():
    result = run_cli([sys.executable, "-c", LATE_STORAGE_CALLBACKS])
    assert_one_line_error(result, r"No space left on device")
    warnings = [line for line in result.stderr.splitlines() if "Event loop is closed" in line]
    assert warnings == ["warning: a library callback failed: RuntimeError: Event loop is closed"], (
        result.stderr[-3000:]
    )


def test_a_bad_value_is_refused_before_tensorflow_loads(tmp_path):
    result = run_cli(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "bt_jax.train",
            f"--workdir={tmp_path / 'run'}",
            "--config.optim.learning_rate_weights=-0.2",
        ]
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "bt_jax.config" in imported, result.stderr[-2000:]
    assert "tensorflow" not in imported and "bt_jax.train.loop" not in imported
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 1 and lines[-1].startswith("error: config.optim.learning_rate")
