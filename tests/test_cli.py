"""The command line, in real subprocesses: overrides, -m sweeps, dry runs, resume, bad keys and bad data."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, TRAIN, VAL, cli, tiny_args


def state(ckpt):
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


def test_overrides_train_and_save(tmp_path, tiny_dir):
    out = tmp_path / "run"
    r = cli(*tiny_args(tiny_dir, out, "train.max_steps=3", "lora.r=4", "train.lr=1e-3", "data.max_length=128",
                       "+train.sft_args.neftune_noise_alpha=5"))
    assert r.returncode == 0, r.stderr[-3000:]
    import torch

    assert torch.load(out / "checkpoint-3" / "training_args.bin", weights_only=False).neftune_noise_alpha == 5
    assert f"Adapter saved to {out / 'final_model'}" in r.stdout
    assert f"python -m sft_recipes.merge run_dir={out}  " in r.stdout  # the next steps; no GGUF for a folder
    # progress: training_log.txt's lines under the bar, not Trainer's dicts
    assert "step=1 epoch=0.02 loss=" in r.stdout and "{'loss'" not in r.stdout
    assert (out / "training_log.txt").read_text().splitlines()[1].startswith("step=1 epoch=0.02 loss=")
    assert json.loads((out / "final_model" / "adapter_config.json").read_text())["r"] == 4
    saved = (out / ".hydra" / "config.yaml").read_text()
    assert "lr: 0.001" in saved and "max_length: 128" in saved
    assert state(out / "checkpoint-3")["global_step"] == 3


def test_multirun_sweep_gives_one_run_dir_per_job(tmp_path, tiny_dir):
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_args(tiny_dir, "unused", "train.max_steps=1") if not a.startswith("hydra.run.dir")]
    r = cli("-m", *args, f"hydra.sweep.dir={sweep}", "lora.r=4,8", "train.lr=1e-4,2e-4")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 4, jobs
    ranks = sorted(json.loads((j / "final_model" / "adapter_config.json").read_text())["r"] for j in jobs)
    assert ranks == [4, 4, 8, 8]
    overrides = [(j / ".hydra" / "overrides.yaml").read_text() for j in jobs]
    assert sum("lora.r=8" in o and "train.lr=0.0002" in o for o in overrides) == 1
    # the same sweep again into that folder: refused before any job starts, every file as it was (each job used to
    # fail, with its .hydra/ files rewritten and an error.txt in a finished run); resume_from=auto leaves them done
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    r = cli("-m", *args, f"hydra.sweep.dir={sweep}", "lora.r=4,8", "train.lr=1e-4,2e-4")
    assert r.returncode == 2 and r.stderr == (f"error: the sweep was not started; {sweep} already holds the runs of "
                                              "job(s) 0, 1, 2, 3. Continue the sweep with resume_from=auto (finished "
                                              "jobs stay as they are), or start it in another folder "
                                              "(hydra.sweep.dir=...).\n")
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before
    elsewhere = tmp_path / "elsewhere"  # (it left an empty outputs/<time>/ in the folder it ran from)
    elsewhere.mkdir()
    r = cli("-m", *args, f"hydra.sweep.dir={sweep}", "lora.r=4,8", "train.lr=1e-4,2e-4", "resume_from=auto",
            cwd=elsewhere)
    assert r.returncode == 0 and r.stdout.count("already finished (step 1 of 1)") == 4, r.stderr[-3000:]
    assert not list(elsewhere.iterdir())
    assert all(p.read_bytes() == before[p] for p in sweep.glob("*/final_model/*"))


def test_a_sweep_checks_every_job_first_and_goes_on_past_a_failed_one(tmp_path, tiny_dir):
    # a bad value in any job fails the sweep before the first job trains (it used to train job 0, then stop at 1)
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_args(tiny_dir, "unused", "train.max_steps=1") if not a.startswith("hydra.run.dir")]
    r = cli("-m", *args, f"hydra.sweep.dir={sweep}", "lora.r=4,-1", "train.lr=1e-4,-2")
    assert r.returncode == 2 and not sweep.exists()
    assert r.stderr.startswith("error: the sweep was not started; job 1 (lora.r=4 train.lr=-2): Invalid configuration: "
                               "train.lr=-2.0 must be positive. job 2 (lora.r=-1 train.lr=0.0001): ")
    # a job that fails at its start (here its data) is listed with its error; the sweep goes on, exit status 1
    (tmp_path / "bad.json").write_text('[{"question": "q", "answer": ""}]')
    args = [a for a in args if not a.startswith("data.train_path")]
    r = cli("-m", *args, f"hydra.sweep.dir={sweep}", f"data.train_path={tmp_path / 'bad.json'},{TRAIN}")
    assert r.returncode == 1 and f"error: 1 sweep job(s) failed: {sweep / '0'} (each holds its error.txt)" in r.stderr
    assert "record 1: field 'answer' is empty" in (sweep / "0" / "error.txt").read_text()
    assert (sweep / "1" / "final_model" / "COMPLETE").exists()
    rows = {row["job"]: row for row in csv.DictReader((sweep / "summary.csv").open())}
    assert rows["1"]["status"] == "done" and rows["0"]["status"].startswith("failed: 1 invalid record(s) in ")


def test_dry_run_reports_and_trains_nothing(tmp_path, tiny_dir):
    out = tmp_path / "dry"
    r = cli(*tiny_args(tiny_dir, out, "dry_run=true", "data.max_length=96"))
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert "Training data: 112 records" in text and "p50=" in text and "p90=" in text and "max=" in text
    assert "over max_length" in text and "truncated" in text
    assert "Trainable parameters:" in text and "max_length: 96" in text
    assert ">>>" in text and "<|im_end|><<<" in text and "Dry run: nothing was trained." in text
    assert "Estimated peak memory:" in text and "p99=" in text
    assert not list(out.glob("checkpoint-*")) and not (out / "final_model").exists()
    report = (out / "data_report.md").read_text()
    assert "| train | 112 | 112 |" in report and "Estimated peak memory" in report and "optimizer steps: 56" in report
    assert (out / "token_lengths.png").stat().st_size > 1000
    # what the saves take on disk, estimated before any weights load, against a run's checkpoint
    disk = re.search(r"Disk: about ([\d.]+) MB at once in .*: 1 checkpoint\(s\) of ([\d.]+) MB \(all the run saves\) and "
                     r"the final model", cli(*tiny_args(tiny_dir, tmp_path / "plan", "dry_run=true", "train.max_steps=2",
                                                        "train.save_steps=2")).stdout)
    r = cli(*tiny_args(tiny_dir, tmp_path / "run", "train.max_steps=2", "train.save_steps=2"))
    measured = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoint-2").iterdir()) / 2**20
    assert r.returncode == 0 and abs(float(disk[2]) - measured) < 0.1 * measured, (disk[0], measured)


def test_dry_run_marks_every_reply_of_a_conversation_with_hydra_job_chdir(tmp_path, tiny_dir):
    """Chat transcripts beside question/answer records: the dry run shows a conversation with each reply marked (the
    last alone with data.train_replies=last). With hydra.job.chdir=true (Hydra moves into the run dir) a relative data
    path is still read from where the command ran."""
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [
        turn("user", "What is a mean?"), turn("assistant", "The average."), turn("user", "And a median?"),
        turn("assistant", "The middle value.")]}))
    args = [a for a in tiny_args(tiny_dir, "outputs/dry", "dry_run=true") if not a.startswith("data.train_path")]
    r = cli(*args, f"data.train_path=[{TRAIN},chats.jsonl]", "hydra.job.chdir=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Training data: 113 records, kept 113;" in r.stdout and "; 1 conversation(s) of several exchanges, every " \
        "reply trained" in r.stdout
    shown = r.stdout.split("One conversation of several exchanges, every reply trained:\n")[1]
    assert ("user\nWhat is a mean?<|im_end|>\n<|im_start|>assistant\n>>>The average.<|im_end|><<<\n<|im_start|>user\n"
            "And a median?<|im_end|>\n<|im_start|>assistant\n>>>The middle value.<|im_end|><<<") in shown
    assert (tmp_path / "outputs" / "dry" / "data_report.md").exists()
    args = [a.replace("outputs/dry", "outputs/last") for a in args]
    r = cli(*args, f"data.train_path=[{TRAIN},chats.jsonl]", "data.train_replies=last", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shown = r.stdout.split("exchanges, the last reply trained (data.train_replies=last):\n")
    assert ("<|im_start|>assistant\nThe average.<|im_end|>\n<|im_start|>user\nAnd a median?<|im_end|>\n"
            "<|im_start|>assistant\n>>>The middle value.<|im_end|><<<") in shown[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
def test_gpu_preset_dry_run_plans_on_a_cpu(tmp_path, tiny_dir):
    """preset=gpu_fast on a machine without CUDA: the dry run warns what would not run here and still reports,
    counting the packed rows its steps are made of; the run itself stops at once with the same reasons."""
    out = tmp_path / "dry"
    args = [a for a in tiny_args(tiny_dir, out, "dry_run=true") if a != "preset=fast_test"] + ["preset=gpu_fast"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: not on this machine: train.activation_offloading=true needs a CUDA GPU" in r.stdout
    assert "warning: not on this machine: flex attention" in r.stdout
    rows = int(r.stdout.split(" samples packed into ")[1].split()[0])  # 112 samples of at most 162 tokens
    assert 1 < rows < 112 and f"Optimizer steps: {3 * math.ceil(rows / 8)} (" in r.stdout, r.stdout[-2000:]
    assert "batch of 8 x 1024 tokens" in r.stdout
    report = (out / "data_report.md").read_text()
    assert f"packed into {rows} rows" in report and "- warning: only " in report  # few steps: 112 samples, 8 rows a step
    r = cli(*[a for a in args if a != "dry_run=true"])
    assert r.returncode != 0 and "train.activation_offloading=false" in r.stderr and not (out / "final_model").exists()


def test_resume_from_auto_continues_the_newest_run(tmp_path, tiny_dir):
    # no hydra.run.dir: runs land in ./outputs/<time>; resume_from=auto finds the newest one with a checkpoint
    args = [a for a in tiny_args(tiny_dir, "unused") if not a.startswith("hydra.run.dir")]
    args += ["train.loraplus_lr_ratio=4"]  # (LoRA+: its optimizer's state resumes too)
    r = cli(*args, "train.max_steps=4", "train.save_steps=2", "train.lr=1e-3", "train.logging_steps=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs").iterdir())
    first, first_metrics = state(run / "checkpoint-4"), json.loads((run / "metrics.json").read_text())
    # simulate a run stopped after step 2: drop what came later
    import shutil

    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final_model")
    r = cli(*args, "train.max_steps=4", "train.save_steps=2", "train.lr=1e-3", "train.logging_steps=1", "resume_from=auto", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from {run / 'checkpoint-2'}" in r.stdout
    assert "Optimizer steps: 4 (" in r.stdout and "Learning rate: 0.001, cosine" in r.stdout
    assert "; LoRA's B matrices at 4x (train.loraplus_lr_ratio)" in r.stdout
    assert f"Run dir: {run}\n" in r.stdout
    assert len(list((tmp_path / "outputs").iterdir())) == 1  # continued in place, no new run dir
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == args + [  # the run's own, kept
        "train.max_steps=4", "train.save_steps=2", "train.lr=1e-3", "train.logging_steps=1"]
    resumed = state(run / "checkpoint-4")
    assert resumed["global_step"] == 4
    log = (run / "training_log.txt").read_text()
    assert "# training starts at step 2 of 4" in log
    # same seed, same data order, restored optimizer/scheduler/RNG: the resumed steps match the original ones
    loss = lambda s, step: next(h["loss"] for h in s["log_history"] if h.get("step") == step and "loss" in h)
    assert abs(loss(resumed, 4) - loss(first, 4)) < 1e-3
    # metrics.json's mean train loss covers all 4 steps, not only the 2 this process trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["mean_train_loss"] - first_metrics["mean_train_loss"]) < 1e-3
    weights = load_file(run / "final_model" / "adapter_model.safetensors")
    assert len(weights) == 2 * 4 * 2 and not any("base_model.model.base_model" in k for k in weights)
    assert "lr 0.001 cosine (LoRA+: B at 4x)" in (run / "final_model" / "README.md").read_text()
    # the same command again (a job rerun until done): the run is finished, nothing is rewritten, status 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = cli(*args, "train.max_steps=4", "train.save_steps=2", "train.lr=1e-3", "train.logging_steps=1", "resume_from=auto", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"The run in {run} already finished (step 4 of 4)" in r.stdout and "Run dir:" not in r.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_from_a_run_or_its_checkpoint(tmp_path, tiny_dir):
    # resume_from=RUN (or RUN's newest checkpoint) continues RUN in place, as resume_from=auto does for the newest
    # run; an older checkpoint continues in a new run dir and leaves RUN byte for byte as it was
    import shutil

    args = [a for a in tiny_args(tiny_dir, "unused") if not a.startswith("hydra.run.dir")]
    args += ["train.max_steps=4", "train.save_steps=2", "train.logging_steps=1"]
    assert cli(*args, cwd=tmp_path).returncode == 0
    (run,) = list((tmp_path / "outputs").iterdir())
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final_model")
    r = cli(*args, f"resume_from={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from {run / 'checkpoint-2'}\n" in r.stdout and f"Run dir: {run}\n" in r.stdout
    assert (run / "final_model" / "COMPLETE").exists() and len(list((tmp_path / "outputs").iterdir())) == 1
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = cli(*args, f"resume_from={run / 'checkpoint-2'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (new,) = [p for p in (tmp_path / "outputs").iterdir() if p != run]
    assert (f"Resuming from {run / 'checkpoint-2'} in a new run dir, {new}; {run} stays as it is (its newest "
            "checkpoint is checkpoint-4)") in r.stdout
    assert (new / "checkpoint-4" / "COMPLETE").exists() and (new / "final_model" / "COMPLETE").exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a dry run into the run's folder is refused: it rewrote .hydra/config.yaml (what evaluate, chat and merge read)
    # and data_stats.json; nor does a dry run combine with resume_from
    r = cli(*args, "dry_run=true", "quantization=nf4", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == (f"error: {run} already holds a run; nothing was changed. A dry run writes "
                                              "its report and config there: give it another folder "
                                              "(hydra.run.dir=...), or none.\n")
    r = cli(*args, "dry_run=true", f"resume_from={run}", cwd=tmp_path)
    assert r.returncode == 2 and "dry_run=true plans a new run; it does not combine with resume_from" in r.stderr
    r = cli(*args, "resume_from=outputs", cwd=tmp_path)  # the folder of runs: its newest checkpoint's run is named
    assert r.returncode == 2 and ("nor a run dir holding one. It holds 2 run(s) that do: give one, e.g. the newest: "
                                  f"resume_from=outputs/{new.name} (or resume_from=auto).") in r.stderr, r.stderr
    assert len(list((tmp_path / "outputs").iterdir())) == 2
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a folder that holds no checkpoint (a dry run's, say) is refused; evaluate/chat/merge say what it is
    dry = tmp_path / "dry"
    assert cli(*tiny_args(tiny_dir, dry, "dry_run=true")).returncode == 0
    r = cli(*args, f"resume_from={dry}", cwd=tmp_path)
    assert r.returncode == 2 and f"resume_from={dry} is neither a complete checkpoint" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sft_recipes.chat", f"run_dir={dry}", "prompt=hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"{dry} holds a dry run: it trained nothing." in r.stderr


def test_resume_alone_continues_a_run_on_its_own_data_from_any_folder(tmp_path, tiny_dir, monkeypatch):
    # a run on the user's own files (relative paths, none of the defaults' files there): resume_from alone, from the
    # same folder or another, trains on the same files (each checkpoint holds their absolute paths); it failed on
    # the default data.train_path before the run's own settings were read. The files are Alpaca's (data.columns,
    # with a list: a resume that kept data.columns failed on its typed config)
    import shutil

    from sft_recipes import runs

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    for source, name in ((TRAIN, "qa.json"), (VAL, "qa_val.json")):
        (project / name).write_text(json.dumps([{"instruction": r["question"], "input": "", "output": r["answer"]}
                                                for r in json.loads(source.read_text())]))
    args = [f"model.name_or_path={tiny_dir}", "model.embedded=null", "quantization=none", "preset=fast_test",
            "data.train_path=qa.json", "data.columns.question=[instruction,input]", "data.columns.answer=output",
            "train.report_to=[]", "train.max_steps=4", "train.save_steps=2", "train.logging_steps=1"]
    assert cli(*args, "hydra.run.dir=outputs/run", cwd=project).returncode == 0
    run = project / "outputs" / "run"
    loss = lambda: next(h["loss"] for h in state(run / "checkpoint-4")["log_history"] if h["step"] == 4)  # noqa: E731
    first = loss()
    for where, resume in ((project, "resume_from=auto"), (elsewhere, f"resume_from={run}")):
        shutil.rmtree(run / "checkpoint-4"), shutil.rmtree(run / "final_model")
        r = cli(resume, *(["hydra.run.dir=outputs/run"] if where == project else []), cwd=where)
        assert r.returncode == 0, r.stderr[-3000:]
        kept = next(line for line in r.stdout.splitlines() if line.startswith("Resuming with the settings"))
        assert f"data.train_path={project / 'qa.json'}, " in kept and f"model.name_or_path={tiny_dir}, " in kept
        assert 'data.columns={"question": ["instruction", "input"], "answer": "output", "source": "source"}' in kept
        assert f"Validation data: {project / 'qa_val.json'} (beside the training file" in r.stdout
        assert abs(loss() - first) < 1e-3 and "data files changed" not in r.stdout
        assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == args  # not resume_from alone
    monkeypatch.chdir(elsewhere)  # evaluate, chat and merge from there find the files too
    assert runs.config(run).data.train_path == str(project / "qa.json")
    # the data file edited since (a record fixed): the resume goes on with it and says so
    records = json.loads((project / "qa.json").read_text())
    (project / "qa.json").write_text(json.dumps([{**records[0], "output": "Fixed."}] + records[1:]))
    shutil.rmtree(run / "checkpoint-4"), shutil.rmtree(run / "final_model")
    r = cli(f"resume_from={run}", cwd=elsewhere)
    assert r.returncode == 0 and ("warning: the data files changed since checkpoint-2 was saved: the run goes on with "
                                  "their records as they are now") in r.stdout, r.stderr[-2000:]


def test_an_installed_wheel_carries_its_config(tmp_path):
    """pip install (not editable) puts conf/ in the package: python -m sft_recipes runs from any folder without
    SFT_RECIPES_CONF (it stopped with Hydra's "Primary config directory not found")."""
    import shutil

    source, site, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "sft_recipes", "conf"):  # (pip builds in the tree it is given)
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(source)], check=True, capture_output=True)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SFT_RECIPES_CONF"} | {"PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import sft_recipes; print(sft_recipes.conf_dir())"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "sft_recipes" / "conf"), where.stderr
    r = subprocess.run([sys.executable, "-m", "sft_recipes", "dry_run=true", f"data.train_path={TRAIN}",
                        "data.template=tutor", "preset=low_memory"], cwd=elsewhere, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "Dry run: nothing was trained" in r.stdout, r.stderr[-2000:]


def test_help_shows_usage_groups_and_the_config(tmp_path):
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and not list(tmp_path.iterdir())  # (writes nothing)
    assert r.stdout.startswith("python -m sft_recipes [group=option ...] [key=value ...]: fine-tune")
    assert "preset: default, fast_test, full_training, gpu_fast, low_memory" in r.stdout
    assert "lora:\n  r: 16\n  alpha: null" in r.stdout and "__main__" not in r.stdout
    resolved = cli("--cfg", "job", "--resolve", "preset=low_memory", cwd=tmp_path)  # Hydra's own view, resolved
    assert resolved.returncode == 0 and "max_length: 512" in resolved.stdout, resolved.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_a_missing_default_data_file_leaves_the_folder_as_it_was(tmp_path):
    r = cli("dry_run=true", cwd=tmp_path)  # the default run dir, outputs/<time>/, and a relative data path
    assert r.returncode == 2 and f"Relative paths start from {tmp_path}. That is the default, the sample data in a " \
        "clone of sft-recipes: give your own with data.train_path=FILE." in r.stderr
    assert not list(tmp_path.iterdir())  # no empty outputs/ behind


def test_misspelled_key_fails_naming_it(tmp_path, tiny_dir):
    r = cli(*tiny_args(tiny_dir, tmp_path / "x", "train.lerning_rate=1e-4"))
    assert r.returncode == 2 and not (tmp_path / "x").exists()
    assert "train.lerning_rate=1e-4: train.lerning_rate is not a setting (did you mean train.lr=1e-4?)" in r.stderr
    # another tool's names, Hydra's + (which would add a key that nothing reads: the run went on with train.lr's
    # default) and output_dir (which put the run's files apart from its .hydra/): every one named, nothing written
    r = cli(*tiny_args(tiny_dir, tmp_path / "x", "+train.learning_rate=1e-4", "max_seq_length=256",
                       "neftune_noise_alpha=5", "output_dir=mine"))
    assert r.returncode == 2 and not (tmp_path / "x").exists() and not (ROOT / "mine").exists()
    for said in ("+train.learning_rate=1e-4: train.learning_rate is not a setting (did you mean train.lr=1e-4?); a + "
                 "adds a key that nothing reads", "max_seq_length=256: max_seq_length is not a setting (did you mean "
                 "data.max_length=256?)", "(did you mean +train.sft_args.neftune_noise_alpha=5?)",
                 "output_dir=mine: a run's folder is chosen with hydra.run.dir=mine"):
        assert said in r.stderr, r.stderr
    out = tmp_path / "y"  # an SFTConfig argument that does not exist: refused before any model loads
    r = cli(*tiny_args(tiny_dir, out, "+train.sft_args.neftun_noise_alpha=5"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists()
    assert "train.sft_args.neftun_noise_alpha is not a trl.SFTConfig argument (did you mean neftune_noise_alpha?)" \
        in r.stderr


def test_a_config_group_of_ones_own_is_not_taken_for_a_key(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "slow.yaml").write_text("# @package _global_\ntrain:\n  lr: 5.0e-5\n")
    r = cli("--config-dir", str(tmp_path), "+experiment=slow", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0 and "  lr: 5.0e-05\n" in r.stdout, r.stderr[-2000:]


def test_bad_data_fails_before_training_and_writes_no_result(tmp_path, tiny_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "Q?", "answer": "A"}, {"question": "Q2?"}]))
    out = tmp_path / "run"
    r = cli(*tiny_args(tiny_dir, out, f"data.train_path={bad}"))
    assert r.returncode == 2
    assert f"invalid record(s) in {bad}: record 2: field 'answer' is missing" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()  # nothing written as if it were a result
    r = cli(*tiny_args(tiny_dir, out, f"data.train_path={bad}", "debug=true"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_unreachable_hub_model_fails_fast_naming_the_way_out(tmp_path):
    r = cli("model=deepseek_math_7b", "dry_run=true", f"hydra.run.dir={tmp_path / 'x'}", timeout=60)
    assert r.returncode == 2
    assert "deepseek-ai/deepseek-math-7b-instruct" in r.stderr and "model.name_or_path=DIR" in r.stderr


def test_setup_check_passes_here(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sft_recipes.check"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "LLAMA_CPP_BIN": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip().endswith("All checks passed."), r.stdout + r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()[:-1]
    assert all(line.startswith("PASS") for line in lines), r.stdout
    items = {line[6:26].strip(): line[26:].strip() for line in lines}
    assert items["4-bit quantization"].startswith("NF4 linear layer on cpu: relative error")
    assert "SmolLM2-135M-Instruct embedded in" in items["default model"]
    assert items["GGUF export"].endswith("not found (optional: bash tools/llama_cpp.sh builds it)")


def test_setup_check_holds_versions_to_the_ranges_in_pyproject(monkeypatch):
    """The ranges are read from the installed package's metadata (pyproject.toml's), not written twice."""
    import importlib.metadata

    from sft_recipes import check

    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "5.20.0" if n == "transformers" else installed(n))
    ranges = check._ranges()
    assert check._version_ok("transformers", ranges) == (False, "5.20.0, need <6,>=5.23 (pip install -e . upgrades it)")
    assert check._version_ok("trl", ranges) == (True, installed("trl"))


def test_what_resume_from_a_path_continues(tmp_path):
    from sft_recipes.resume import checkpoint_of, continued_run

    run = tmp_path / "run"
    for name, files in [("checkpoint-2", ["COMPLETE", "trainer_state.json"]), ("checkpoint-10", ["COMPLETE", "trainer_state.json"]),
                        ("checkpoint-12", ["trainer_state.json"]), ("final_model", ["COMPLETE"])]:  # 12: cut short
        (run / name).mkdir(parents=True)
        for f in files:
            (run / name / f).write_text("")
    newest = run / "checkpoint-10"
    for path in (run, newest, run / "final_model"):  # the run, its newest complete checkpoint, its adapter
        assert checkpoint_of(path) == newest and continued_run(path) == run
    assert checkpoint_of(run / "checkpoint-2") == run / "checkpoint-2" and continued_run(run / "checkpoint-2") is None
    assert checkpoint_of(tmp_path) is None and continued_run(tmp_path) is None


def test_questions_that_trained_the_starting_adapter_are_warned_about(tmp_path, tiny_dir):
    # an adapter trained on the validation questions, then trained further on other data: the validation loss and
    # evaluate's scores are optimistic, though this run's own training data holds none of those questions
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli(*tiny_args(tiny_dir, first, f"data.train_path={VAL}", "data.val_path=null", "train.max_steps=1")
               ).returncode == 0
    r = cli(*tiny_args(tiny_dir, second, f"model.adapter={first}", "train.max_steps=1"))  # trains on TRAIN, validates on VAL
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"warning: 20 validation question(s) trained the adapter this run starts from (model.adapter="
            f"{first / 'final_model'}; e.g. {VAL}, record 1): the validation loss will be optimistic") in r.stdout
    r = subprocess.run([sys.executable, "-m", "sft_recipes.evaluate", f"run_dir={second}", "limit=2",
                        "max_new_tokens=2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("warning: 2 of the 2 questions in the validation split also appear in the training data (of this run or "
            "of the runs whose adapter it trained further, model.adapter)") in r.stdout


def test_a_path_in_the_home_folder(tmp_path, tiny_dir):
    # data.train_path=~/qa.json: no shell expands a ~ there and Hydra's lexer refuses it with a cryptic message; ours
    # says what to write instead, and a quoted '~/qa.json' means the home folder
    import shutil

    shutil.copy(TRAIN, tmp_path / "qa.json")
    r = cli(*tiny_args(tiny_dir, tmp_path / "a", "dry_run=true"), "data.train_path=~/qa.json")
    assert r.returncode == 2 and r.stderr == ("error: data.train_path=~/qa.json: Hydra reads a ~ at the start of a value "
                                              "as its own syntax, and no shell expands it there; write "
                                              "data.train_path=$HOME/qa.json (or quote it: \"data.train_path="
                                              "'~/qa.json'\").\n")
    r = subprocess.run([sys.executable, "-m", "sft_recipes", *tiny_args(tiny_dir, tmp_path / "b", "dry_run=true"),
                        "data.train_path='~/qa.json'"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0 and "Training data: 112 records" in r.stdout, r.stderr[-2000:]


def test_lora_settings_that_clash_with_model_adapter_are_refused(tmp_path, tiny_dir):
    # training an adapter further keeps its shape: lora.r=8 on the command line against an r=4 adapter is refused;
    # what the command line does not set (lora.alpha, the targets) is taken from the adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    r = cli(*tiny_args(tiny_dir, tmp_path / "a", f"model.adapter={tmp_path / 'adapter'}", "lora.r=8", "dry_run=true"))
    assert r.returncode == 2 and (f"model.adapter={tmp_path / 'adapter'} has lora.r=4; this command sets lora.r=8. "
                                  "Training an adapter further keeps its LoRA settings") in r.stderr
    r = cli(*tiny_args(tiny_dir, tmp_path / "b", f"model.adapter={tmp_path / 'adapter'}", "dry_run=true"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lora.r=4, lora.alpha=8" in r.stdout and "LoRA r=4, alpha 8 on ['q_proj', 'v_proj']" in r.stdout
