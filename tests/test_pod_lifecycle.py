"""A pod job's whole life with real processes: `jax.distributed` over gloo on 127.0.0.1, every
process running the same command, through full epochs, preemptions, a lost host and restarts.

The reference is one process with 4 devices on the same global batch; every multi-process run,
however it was interrupted and resumed, must end with its parameters to 1e-5 relative to the
parameters' scale: only the order of cross-process float sums differs. The recipe trains at a
tenth of the official learning rates: at full rate this width-4 network's float32 dynamics
amplify a 1e-7 rounding difference ~3x a step (1e-3 of the parameter norm after 10 steps, with
1 process of 4 devices against 2 of 2), which would test the chaos, not the code.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
import tensorflow as tf
from train_helpers import REPO, free_port, restore_params, subprocess_env, trainer_command

from bt_jax import checkpoint, metric_logging

pytestmark = pytest.mark.slow

# 1500 digits at batch 256: 5 steps an epoch, 3 epochs; 8 px (the digits' own size).
RECIPE = dict(
    batch_size=256,
    num_epochs=3,
    max_steps=-1,
    data__image_size=8,
    data__eval_resize=8,
    checkpoint__every_steps=4,
    checkpoint__keep=10,
    logging__every_steps=1,
    eval__at_end=False,
    optim__learning_rate_weights=0.02,
    optim__learning_rate_biases=0.00048,
)
TOTAL_STEPS = 15
HEARTBEAT = 5  # seconds: how soon the survivors of a lost host stop


class Job:
    """One command started on ``num_processes`` processes of ``devices`` CPU devices each."""

    def __init__(self, workdir, num_processes, devices, **overrides):
        self.workdir = workdir
        command = trainer_command(workdir, **{**RECIPE, **overrides})
        # As `python -m bt_jax.train`, with each program compiled once for all processes and
        # every factorisation of the 4 devices (the reference's 1 x 4 included).
        command = [sys.executable, os.path.join(REPO, "tests", "pod_host.py"), *command[3:]]
        if num_processes > 1:
            port = free_port()
            command += [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}",
                f"--heartbeat_timeout_seconds={HEARTBEAT}",
            ]
        self.started = time.time()
        self.processes = [
            subprocess.Popen(
                command + ([f"--process_id={i}"] if num_processes > 1 else []),
                cwd=REPO,
                env=subprocess_env(devices),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(num_processes)
        ]
        self.stdout = [""] * num_processes
        self.stderr = [""] * num_processes
        self.exited_at = [None] * num_processes

    def wait(self, timeout=600):
        for i, process in enumerate(self.processes):
            self.stdout[i], self.stderr[i] = process.communicate(timeout=timeout)
            self.exited_at[i] = time.time()
        return [p.returncode for p in self.processes]

    def logged_step(self):
        """The last step in the run's metrics (process 0 writes them)."""
        records = (
            metric_logging.read_metrics(self.workdir)
            if os.path.isdir(os.path.join(self.workdir, "metrics"))
            else []
        )
        steps = [r["step"] for r in records if "loss" in r]
        return max(steps, default=0)

    def wait_for_step(self, step, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline and self.logged_step() < step:
            assert all(p.poll() is None for p in self.processes), self.dump()
            time.sleep(0.1)
        assert self.logged_step() >= step, self.dump()

    def signal(self, signum, which=None):
        for i, process in enumerate(self.processes):
            if which is None or i in which:
                process.send_signal(signum)
        return time.time()

    def dump(self):
        for process in self.processes:
            if process.poll() is not None and process.stderr and not process.stderr.closed:
                return process.stderr.read()[-3000:]
        return ""


def stopped_step(stderr):
    found = re.findall(r"Stopped by a signal at step (\d+)", stderr)
    return int(found[-1]) if found else None


def assert_same_parameters(workdir, reference):
    params, step = restore_params(workdir)
    assert step == TOTAL_STEPS
    scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(reference))
    chex.assert_trees_all_close(params, reference, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 4 devices, uninterrupted: the parameters every pod run must end with."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    job = Job(workdir, 1, 4)
    assert job.wait() == [0], job.stderr[0][-3000:]
    params = restore_params(workdir)[0]
    # The parameters moved far more than the tolerance after step 4: the comparison is not of
    # near-initial states.
    after_4 = checkpoint.read_variables(workdir, 4, part=None)["params"]
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(after_4))
    )
    assert moved > 1e-3
    return params


def test_a_pod_job_through_preemptions_a_lost_host_and_restarts_to_the_end_of_the_run(
    reference, tmp_path
):
    """One workdir through SIGTERM to every process (4 processes x 1 device), SIGTERM to one
    process and SIGKILL of one process (2 x 2), each followed by the same command again, then
    through the remaining epochs to the end of the run: export and the end-of-run evaluation on
    both processes."""
    workdir = str(tmp_path / "pod")
    started = time.time()
    # 1. A preemption of every host, on another factorisation of the same 4 devices (4
    # processes of 1 device): all stop at the same step, save it, exit 0; the later starts
    # resume it as 2 processes of 2 devices.
    job = Job(workdir, 4, 1, eval__at_end=True)
    job.wait_for_step(2)
    sent = job.signal(signal.SIGTERM)
    assert job.wait() == [0, 0, 0, 0], job.stderr
    first = [stopped_step(s) for s in job.stderr]
    assert first[0] is not None and len(set(first)) == 1, job.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(first[0])))
    print(
        f"\nSIGTERM to all 4 processes of 1 device: stopped at step {first[0]}, all exited "
        f"{max(job.exited_at) - sent:.1f} s after the signal"
    )

    # 2. A preemption of one host: the job still stops at one agreed step.
    job = Job(workdir, 2, 2, eval__at_end=True)
    job.wait_for_step(first[0] + 2)
    sent = job.signal(signal.SIGTERM, which={1})
    assert job.wait() == [0, 0], job.stderr
    second = [stopped_step(s) for s in job.stderr]
    assert second[0] is not None and second[0] == second[1] > first[0], job.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(second[0])))
    print(
        f"SIGTERM to process 1 only: stopped at step {second[0]}, both exited "
        f"{max(job.exited_at) - sent:.1f} s after the signal"
    )
    if second[0] >= TOTAL_STEPS - 1:
        pytest.fail(f"the run reached step {second[0]} before the host loss could be tested")

    # 3. A host lost: the survivor stops (non-zero) within the heartbeat bound.
    job = Job(workdir, 2, 2, eval__at_end=True)
    job.wait_for_step(second[0] + 1)
    killed = job.signal(signal.SIGKILL, which={1})
    codes = job.wait(timeout=120)
    survivor_seconds = job.exited_at[0] - killed
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, job.stderr[0][-3000:]
    assert survivor_seconds < HEARTBEAT + 30, survivor_seconds
    print(
        f"SIGKILL of process 1: process 0 exited with status {codes[0]} "
        f"{survivor_seconds:.1f} s later"
    )

    # 4. The same command again: resumes from the last complete checkpoint, runs the remaining
    # epochs, exports and evaluates on both processes.
    job = Job(workdir, 2, 2, eval__at_end=True)
    assert job.wait() == [0, 0], job.stderr
    print(f"The whole job, 4 starts (4 x 1, then 2 x 2 devices): {time.time() - started:.1f} s")
    assert_same_parameters(workdir, reference)
    records = metric_logging.read_metrics(workdir)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # every step logged exactly once
    # Every epoch end: the probe's test accuracy (computed on every process's devices).
    assert [r["step"] for r in records if "probe_test_accuracy" in r] == [5, 10, 15]
    saved = {int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()}
    assert {first[0], second[0], 12, 15} <= saved
    tags = {
        value.tag
        for path in glob.glob(os.path.join(workdir, "events.out.tfevents*"))
        for event in tf.compat.v1.train.summary_iterator(path)
        for value in event.summary.value
    }
    assert "cross_correlation" in tags and "loss" in tags
    assert os.path.exists(os.path.join(workdir, "backbone.msgpack"))
    quick = json.load(open(os.path.join(workdir, "eval_quick.json")))
    assert 0.0 <= quick["results"]["knn"]["pretrained"]["top1"] <= 1.0
    # Both processes evaluated (each its share), only process 0 printed and wrote.
    assert "kNN top-1" in job.stdout[0] and "kNN top-1" not in job.stdout[1]
    assert not os.path.exists(os.path.join(workdir, "lock.json"))
