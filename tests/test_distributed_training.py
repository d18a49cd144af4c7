"""`tiltgen train-guidance` in 2 processes (torchrun + gloo): data generation split between them,
DDP-style training, and SIGKILL + --resume matching the uninterrupted run; resumable data
generation in one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

pytest.importorskip("diffusers")

import diffusers_tiny as tiny  # noqa: E402

from tiltgen.cli.main import main  # noqa: E402

PROMPTS = ["a cat", "a dog", "a bird", "a fish", "a cow", "a pig"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd")
    tiny.tiny_sd("ddim").save_pretrained(path)
    return path


def train_argv(model: Path, out: Path, steps: int = 40, *extra: str) -> list[str]:
    argv = ["train-guidance", "--model", str(model), "--reward", "brightness", "--beta", "0.5", "--cfg", "1",
            "--height", "16", "--width", "16", "--data-steps", "2", "--steps", str(steps), "--batch-size", "16",
            "--n-data", "4", "--pool-size", "256", "--eta", "0", "--checkpoint-every", "5", "--no-progress",
            "--out", str(out), *extra]
    for p in PROMPTS:
        argv += ["--prompt", p]
    return argv


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "tiltgen.cli.main", *argv]


def kill_all_with(text: str) -> None:
    """SIGKILL every process whose command line contains ``text``."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def losses(out: Path) -> list[float]:
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        return json.loads(f.metadata()["losses"])


def test_two_process_training_killed_and_resumed_matches_the_uninterrupted_run(sd_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(torchrun(train_argv(sd_dir, whole)), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((whole / "guidance.json").read_text())
    assert record["steps"] == 40 and record["train_reward_evals"] == 24  # 6 prompts x 4, split over 2 processes
    assert not (whole / "data-shards").exists()

    process = subprocess.Popen(torchrun(train_argv(sd_dir, killed, 40)), env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoint.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if checkpoint.is_file():
            try:
                if 10 <= len(losses(killed)) < 40:
                    break
            except Exception:  # being renamed into place
                pass
        time.sleep(0.02)
    assert process.poll() is None, "finished before it could be killed"
    kill_all_with(str(killed))  # the launcher and both workers (they run in sessions of their own)
    process.wait()
    stopped_at = len(losses(killed))
    assert 10 <= stopped_at < 40 and not (killed / "guidance.json").exists()

    resumed = subprocess.run(torchrun(train_argv(sd_dir, killed, 40, "--resume")), env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at} of 40" in resumed.stdout
    assert losses(killed) == pytest.approx(losses(whole), rel=1e-5, abs=1e-6)
    assert json.loads((killed / "guidance.json").read_text())["final_loss"] == pytest.approx(record["final_loss"],
                                                                                              rel=1e-5)

    other = subprocess.run(torchrun(train_argv(sd_dir, killed, 40, "--resume", "--lr", "0.01")), env=env(),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "differs" in other.stderr and "(lr)" in other.stderr  # torchrun exits 1


def test_data_generation_interrupted_keeps_its_batches(sd_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C during data generation keeps the finished batches; --resume makes only the rest,
    and the data equal an uninterrupted run's."""
    from safetensors.torch import load_file

    import tiltgen.tilt.learned.train as train_module

    reference = tmp_path / "reference"
    assert main(train_argv(sd_dir, reference, 5)) == 0
    out = tmp_path / "out"
    real = train_module.generate_unit
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "generate_unit", interrupted)
    assert main(train_argv(sd_dir, out, 5)) == 130
    assert "--resume to continue" in capsys.readouterr().err
    assert len(list((out / "data-shards").glob("unit-*.safetensors"))) == 3
    monkeypatch.setattr(train_module, "generate_unit", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    assert main(train_argv(sd_dir, out, 5, "--resume")) == 0
    assert "resumed guidance data: 12 of 24 samples (3 of 6 batches)" in capsys.readouterr().out
    assert len(calls) == 6  # 3 before the interrupt, 3 after
    mine, theirs = load_file(str(out / "data.safetensors")), load_file(str(reference / "data.safetensors"))
    assert set(mine) == set(theirs) and all((mine[k] == theirs[k]).all() for k in mine)


@pytest.mark.parametrize("method", ["rwdsm", pytest.param("draft", marks=pytest.mark.slow)])
def test_finetune_in_two_processes_takes_the_same_steps_as_one(sd_dir, tmp_path, method):
    """Each process takes every 2nd row of the step's minibatch and the gradients are averaged:
    the loss curve (the mean over the whole minibatch) equals the one-process run's."""
    argv = ["finetune", "--method", method, "--model", str(sd_dir), "--reward", "brightness", "--beta", "0.5",
            "--steps", "4", "--batch-size", "4", "--samples-per-prompt", "4", "--data-steps", "2", "--cfg", "1",
            "--height", "16", "--width", "16", "--no-progress", *sum((["--prompt", p] for p in PROMPTS[:3]), [])]
    runs = {}
    for name, command in (("one", [sys.executable, "-m", "tiltgen.cli.main"]), ("two", torchrun([]))):
        out = tmp_path / name
        done = subprocess.run(command + argv + ["--out", str(out)], env=env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(runs["one"]) == len(runs["two"]) == 4
    for a, b in zip(runs["one"], runs["two"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        if method == "draft":
            assert a["reward"] == pytest.approx(b["reward"], rel=1e-4, abs=1e-6)


def test_finetune_killed_and_resumed_matches_the_uninterrupted_run(sd_dir, tmp_path):
    """SIGKILL in the middle of fine-tuning, then the same command with --resume: it goes on from
    the last checkpoint (weights, optimiser, step, log) and ends with the uninterrupted run's
    loss curve and budget folders."""
    import torch

    argv = ["finetune", "--method", "rwdsm", "--model", str(sd_dir), "--reward", "brightness", "--beta", "0.5",
            "--steps", "60", "--budgets", "40", "--batch-size", "4", "--samples-per-prompt", "4",
            "--data-steps", "2", "--cfg", "1", "--height", "16", "--width", "16", "--checkpoint-every", "1",
            "--no-progress", *sum((["--prompt", p] for p in PROMPTS[:3]), [])]
    command = [sys.executable, "-m", "tiltgen.cli.main", *argv]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(command + ["--out", str(whole)], env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    process = subprocess.Popen(command + ["--out", str(killed)], env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint, step = killed / ".work" / "checkpoint.pt", 0
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and step < 5:
        if checkpoint.is_file():
            step = torch.load(checkpoint, weights_only=False)["state"]["step"]
        time.sleep(0.01)
    assert process.poll() is None, "finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = torch.load(checkpoint, weights_only=False)["state"]["step"]
    assert 5 <= stopped_at < 60 and not (killed / "finetune.json").exists()

    resumed = subprocess.run(command + ["--out", str(killed), "--resume"], env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at} of 60" in resumed.stdout
    curves = [[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (whole, killed)]
    assert [row["step"] for row in curves[1]] == list(range(1, 61))
    assert [row["loss"] for row in curves[1]] == pytest.approx([row["loss"] for row in curves[0]], rel=1e-5, abs=1e-7)
    assert (killed / "step-000040" / "model_index.json").is_file()


def test_a_finished_command_leaves_its_process_group_and_a_failed_one_does_not(tmp_path, capsys):
    """A worker that exits holding its gloo group can abort at exit (SIGABRT) after its work is
    done; a finished command therefore leaves the group (after a barrier). A failed one leaves it
    alone: its peers may never reach that barrier."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["train-guidance", "--out", str(tmp_path / "x")]) == 2  # neither --case nor --model
        assert dist.is_initialized()
        assert main(["models"]) == 0
        assert not dist.is_initialized()
        assert main(["models"]) == 0  # without a group: nothing to leave
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
