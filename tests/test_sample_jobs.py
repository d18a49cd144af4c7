"""`tiltgen sample --prompts FILE`: prompt files, per-image seeds, the manifest, resume after a
kill, and the same images from 1 and 2 processes (torchrun + gloo)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tiltgen.core.distributed import Processes, threads_per_process  # noqa: E402
from tiltgen.core.prompts import PROMPT_SEED_STRIDE, Prompt, PromptRow, image_seed, read_prompt_file  # noqa: E402
from tiltgen.errors import TiltgenError  # noqa: E402
from tiltgen.eval.sample_job import Ledger, plan_items, read_manifest, run_job, start_output  # noqa: E402

pytest.importorskip("diffusers")

import diffusers_tiny as tiny  # noqa: E402

from tiltgen.cli.main import main  # noqa: E402

WORDS = ["a cat", "a dog", "a red cat", "two dogs", "a bird", "a fish", "a blue bird", "cats", "dogs", "fish",
         "a cow", "a pig"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd")
    tiny.tiny_sd("ddim").save_pretrained(path)
    return path


def sample_argv(model, prompts_file, out, *extra):
    return ["sample", "--model", str(model), "--prompts", str(prompts_file), "--images-per-prompt", "2", "--steps", "2",
            "--cfg", "1", "--height", "16", "--width", "16", "--seed", "5", "--reward", "brightness",
            "--eval-reward", "saturation", "--out", str(out), "--no-progress", *extra]


def pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


# ---- prompt files ------------------------------------------------------------------------------------
def test_prompt_files_of_every_format(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert [r.text for r in read_prompt_file(txt)] == ["a cat", "a dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "seed": 7, "count": 2}\n\n{"prompt": "", "negative_prompt": "dog"}\n')
    rows = read_prompt_file(jsonl)
    assert (rows[0].seed, rows[0].fields, rows[1].text, rows[1].negative_prompt) == (7, {"count": 2}, "", "dog")
    prompt = rows[0].prompt
    assert isinstance(prompt, str) and prompt == "a cat" and prompt.fields == {"count": 2}
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,colour\n"a cat, sitting",3,red\na dog,,blue\n')
    rows = read_prompt_file(csv)
    assert [(r.text, r.seed, r.fields) for r in rows] == [("a cat, sitting", 3, {"colour": "red"}),
                                                           ("a dog", None, {"colour": "blue"})]


@pytest.mark.parametrize("name,text,message", [
    ("empty.txt", "", "holds no prompt"),
    ("blank.txt", "\n  \n", "holds no prompt"),
    ("bad.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"\n', "bad.jsonl:2: not valid JSON"),
    ("noprompt.jsonl", '{"text": "a cat"}\n', "noprompt.jsonl:1: no 'prompt' field"),
    ("list.jsonl", '["a cat"]\n', "list.jsonl:1: expected a JSON object"),
    ("seed.jsonl", '{"prompt": "a cat"}\n\n{"prompt": "a dog", "seed": "x1"}\n', "seed.jsonl:3: seed must be an integer"),
    ("seed.csv", "prompt,seed\na cat,1\na dog,1.5\n", "seed.csv:3: seed must be an integer"),
    ("nocol.csv", "text,seed\na cat,1\n", "nocol.csv:1: the header has no 'prompt' column"),
])
def test_bad_prompt_files_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TiltgenError, match=message):
        read_prompt_file(path)


def test_cli_prompt_file_errors_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat", "seed": 1.5}\n')
    assert main(["sample", "--model", "org/not-here", "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: seed must be an integer" in capsys.readouterr().err


def test_seeds_are_fixed_by_prompt_and_sample_index():
    assert image_seed(5, 0, 0) == 5 and image_seed(5, 0, 3) == 8
    assert image_seed(5, 2, 1) == 5 + 2 * PROMPT_SEED_STRIDE + 1
    assert image_seed(5, 2, 1, row_seed=40) == 41
    rows = PromptRow
    items = plan_items([rows("a"), rows("b", seed=9)], 3, 5)
    assert [i.seed for i in items] == [5, 6, 7, 9, 10, 11]
    # more images per prompt keeps the first ones
    assert [i.seed for i in plan_items([rows("a"), rows("b")], 2, 5)] == [5, 6, 5 + PROMPT_SEED_STRIDE,
                                                                           6 + PROMPT_SEED_STRIDE]


def test_prompt_keeps_fields_through_pickling():
    import pickle

    p = pickle.loads(pickle.dumps(Prompt("a cat", {"n": 1})))
    assert p == "a cat" and p.fields == {"n": 1}


def test_threads_split_between_local_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TILTGEN_THREADS", raising=False)
    monkeypatch.setattr("tiltgen.core.distributed.available_cores", lambda: 16)
    assert threads_per_process(1) == 16 and threads_per_process(4) == 4 and threads_per_process(32) == 1
    assert threads_per_process(4, requested=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads_per_process(4) == 2


# ---- the job: ledger, resume, manifest ---------------------------------------------------------------
def fake_sample(chunk):
    return torch.stack([torch.full((3, 4, 4), (item.seed % 97) / 97.0) for item in chunk])


def fake_score(images, chunk):
    return images.mean(dim=(1, 2, 3)).tolist(), {}


def test_a_killed_job_resumes_without_loss_or_duplicates(tmp_path):
    rows = PromptRow
    items = plan_items([rows(w) for w in WORDS[:5]], 3, 0)
    out = tmp_path / "job"
    start_output(out, {"a": 1}, "fresh")
    calls = []

    def dying(chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(chunk)
        return fake_sample(chunk)

    with pytest.raises(KeyboardInterrupt):
        run_job(out, items, batch_size=4, sample=dying, score=fake_score, row_info={}, processes=Processes(),
                progress=False)
    assert sorted(Ledger(out, 0).done()) == [0, 1]
    with open(out / ".work" / "ledger-0.jsonl", "a") as f:
        f.write('{"chunk": 2, "rows": [{"ima')   # a kill inside a ledger write leaves a torn line
    made = []
    job = run_job(out, items, batch_size=4, sample=lambda c: made.append(c) or fake_sample(c), score=fake_score,
                  row_info={}, processes=Processes(), progress=False)
    assert job.resumed_images == 8 and job.made_images == 7 and len(made) == 2
    assert [(r["prompt_index"], r["sample_index"]) for r in job.rows] == [(i.prompt_index, i.sample_index) for i in items]
    assert len(set(r["image"] for r in job.rows)) == 15 == len(list((out / "images").glob("*.png")))


def test_two_ranks_split_the_chunks(tmp_path):
    rows = PromptRow
    items = plan_items([rows(w) for w in WORDS[:3]], 3, 0)
    out = tmp_path / "job"
    start_output(out, {"a": 1}, "fresh")
    seen = {}
    for rank in (1, 0):  # rank 1 first: the main process then gathers both ledgers
        seen[rank] = []
        job = run_job(out, items, batch_size=2, sample=lambda c, r=rank: seen[r].append(c) or fake_sample(c),
                      score=fake_score, row_info={}, processes=Processes(rank=rank, world_size=2), progress=False)
    assert [len(c) for c in seen[0]] == [2, 2, 1] and [len(c) for c in seen[1]] == [2, 2]
    assert len(job.rows) == 9


# ---- the command -------------------------------------------------------------------------------------
@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": w, **({"seed": 77} if i == 2 else {})}) + "\n"
                            for i, w in enumerate(WORDS[:4])))
    return path


def test_sample_over_a_prompt_file_writes_a_manifest(sd_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    assert main(sample_argv(sd_dir, prompts_file, out, "--batch-size", "3")) == 0
    rows = read_manifest(out)
    assert len(rows) == 8 and [r["seed"] for r in rows[:6]] == [5, 6, 5 + PROMPT_SEED_STRIDE, 6 + PROMPT_SEED_STRIDE,
                                                                77, 78]
    assert {"image", "prompt", "prompt_index", "sample_index", "seed", "method", "beta", "reward",
            "eval:saturation"} <= set(rows[0])
    assert all(isinstance(r["eval:saturation"], float) and (out / r["image"]).is_file() for r in rows)
    assert not (out / ".work").exists()
    # batch size does not change the images or the rewards
    other = tmp_path / "other"
    assert main(sample_argv(sd_dir, prompts_file, other, "--batch-size", "1")) == 0
    assert pngs(other) == pngs(out)
    for a, b in zip(read_manifest(other), rows):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
    # the same command again: nothing to do; another setting: refused, naming it
    assert main(sample_argv(sd_dir, prompts_file, out)) == 0
    assert main(sample_argv(sd_dir, prompts_file, out, "--seed", "6")) == 2


def test_a_different_run_in_the_same_folder_is_refused_then_replaced(sd_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(sample_argv(sd_dir, prompts_file, out)) == 0
    argv = sample_argv(sd_dir, prompts_file, out, "--n", "1", "--method", "tweedie", "--beta", "0.5")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different settings (beta, method, n)" in err and "--overwrite" in err
    assert main(argv + ["--overwrite"]) == 0
    rows = read_manifest(out)
    assert len(rows) == 4 and {r["method"] for r in rows} == {"tweedie"}
    assert sorted(pngs(out)) == sorted(Path(r["image"]).name for r in rows)  # no stale image of the first run


def same_rows(rows: list[dict], others: list[dict]) -> None:
    """Equal manifests; reward values within 1e-6 (processes with other thread counts sum in
    another order)."""
    assert len(rows) == len(others)
    for a, b in zip(rows, others):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
            else:
                assert a[key] == b[key], key


def cli(*args):
    return [sys.executable, "-m", "tiltgen.cli.main", *args]


def run_env(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def test_sigkill_during_sampling_loses_and_duplicates_nothing(sd_dir, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(WORDS * 2) + "\n")
    reference, out = tmp_path / "reference", tmp_path / "killed"
    argv = sample_argv(sd_dir, prompts, out, "--batch-size", "2")
    process = subprocess.Popen(cli(*argv), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ledger = out / ".work" / "ledger-0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if ledger.is_file() and ledger.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, f"finished before the kill: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = ledger.read_text().count("\n")
    assert 3 <= done_before < 24 and not (out / "sample.json").exists()
    assert main(argv) == 0
    record = json.loads((out / "sample.json").read_text())
    assert record["images_resumed"] >= 6 and record["images_made"] + record["images_resumed"] == 48
    assert main(sample_argv(sd_dir, prompts, reference, "--batch-size", "2")) == 0
    assert pngs(out) == pngs(reference) and len(pngs(out)) == 48
    same_rows(read_manifest(out), read_manifest(reference))


def test_one_and_two_processes_give_the_same_images(sd_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(WORDS[:5]) + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    assert subprocess.run(cli(*sample_argv(sd_dir, prompts, one, "--batch-size", "3")), env=run_env(),
                          capture_output=True).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "tiltgen.cli.main"]
    done = subprocess.run(torchrun + sample_argv(sd_dir, prompts, two, "--batch-size", "3"), env=run_env(),
                          capture_output=True, text=True, timeout=300)
    # both ends of stderr: a worker that dies first reports at the top, the launcher's summary at the bottom
    assert done.returncode == 0, done.stderr[:4000] + "\n...\n" + done.stderr[-3000:]
    assert json.loads((two / "sample.json").read_text())["processes"] == 2
    assert pngs(one) == pngs(two) and len(pngs(one)) == 10
    same_rows(read_manifest(one), read_manifest(two))
    shutil.rmtree(two)
