"""Several processes through accelerate (2 on the CPU, gloo), sweep summaries, and the launch configs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, VAL, cli, loss_history, tiny_args

CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("padding_free", [True, False])
def test_two_processes_on_the_cpu_match_one(tmp_path, tiny_dir, padding_free):
    # 19 validation records: the last round of validation batches (2 processes x 2) holds 3, and accelerate repeats
    # the first record to fill the second process's batch; it must count once
    val = tmp_path / "val.json"
    val.write_text(json.dumps(json.loads(VAL.read_text())[:19]))
    common = ["train.max_steps=6", "train.save_steps=3", "train.logging_steps=1", "train.lr=2e-3", "train.grad_accum=1",
              f"data.val_path={val}", f"train.padding_free={padding_free}"]
    single = cli(*tiny_args(tiny_dir, tmp_path / "one", *common, "train.batch_size=4"))
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/ddp.yaml"),
         "-m", "sft_recipes", *tiny_args(tiny_dir, tmp_path / "two", *common, "train.batch_size=2")],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    two = tmp_path / "two"
    # only the main process reports and writes (the loss curve below shows both trained on the same data)
    assert multi.stdout.count("Training data: 112 records") == 1 and multi.stdout.count("Adapter saved to") == 1
    assert (two / "final_model" / "adapter_model.safetensors").exists()
    log = (two / "training_log.txt").read_text()
    assert log.count("# training starts") == 1 and log.count("step=6 ") >= 1
    one_h, two_h = loss_history(tmp_path / "one"), loss_history(two)
    assert sorted(one_h) == sorted(two_h) == list(range(1, 7))
    # the same 4 samples per optimizer step, split over 2 processes: the same loss curve
    assert all(abs(one_h[s] - two_h[s]) < 2e-2 for s in one_h), (one_h, two_h)
    for checkpoint in ("checkpoint-3", "checkpoint-6"):  # each process's RNG state, in the folder before it is published
        assert {p.name for p in (two / checkpoint).glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    state = json.loads((two / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(6 * 4 / 112, rel=1e-3)
    # validation over both processes (the sums of each reduced): the same validation loss as one process
    one_v, two_v = loss_history(tmp_path / "one", "eval_loss"), loss_history(two, "eval_loss")
    assert sorted(one_v) == sorted(two_v) == [3, 6]
    assert all(abs(one_v[s] - two_v[s]) < 5e-3 for s in one_v), (one_v, two_v)
    # and exactly: the last validation (of the weights saved as final_model) against one process, sample by sample
    from sft_recipes import runs

    cfg = runs.config(two)
    tok = runs.tokenizer(two)
    exact = runs.mean_loss(runs.adapter_model(cfg, two), runs.validation(cfg, tok)[1])
    assert abs(two_v[6] - exact) < 2e-5, (two_v[6], exact)  # counting record 0 twice moved it by 4e-4


def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path, tiny_dir):
    """A scheduler may signal one process of a launch: both finish the same step, one checkpoint is saved whole."""
    import signal
    import time

    import psutil

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/ddp.yaml"),
         "-m", "sft_recipes", *tiny_args(tiny_dir, out, "train.max_steps=200", "train.logging_steps=1",
                                         "data.val_path=null")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log, deadline = out / "training_log.txt", time.time() + 300
    while time.time() < deadline and not (log.exists() and "step=3 " in log.read_text()):
        time.sleep(0.05)
    (second,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    second.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0  # (the launcher reports its processes' status 143 as a failure)
    stopped_at = int(stdout.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    assert 3 <= stopped_at < 200 and (out / f"checkpoint-{stopped_at}" / "COMPLETE").exists(), stdout[-2000:]
    assert json.loads((out / f"checkpoint-{stopped_at}" / "trainer_state.json").read_text())["global_step"] == stopped_at


def test_sweep_summary_from_a_real_multirun(tmp_path, tiny_dir):
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_args(tiny_dir, "unused", "train.max_steps=2", "train.save_steps=1")
            if not a.startswith("hydra.run.dir")]
    r = cli("-m", *args, f"hydra.sweep.dir={sweep}", "lora.r=4,8", "eval.after_train=true", "eval.limit=2",
            "eval.max_new_tokens=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Sweep summary (2 jobs): {sweep / 'summary.md'}" in r.stdout
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("job,status,overrides,best_eval_loss")
    assert rows[0].endswith(",rouge_l,token_f1,stopped_at_end_of_turn,words")  # the answers' scores (eval.after_train)
    assert {row.split(",")[2] for row in rows[1:]} == {"lora.r=4", "lora.r=8"}  # only what differs
    md = (sweep / "summary.md").read_text()
    assert "| lora.r=4 |" in md.replace("| done ", "") or "lora.r=4" in md
    losses = [float(row.split(",")[3]) for row in rows[1:]]
    assert losses == sorted(losses)  # best validation loss first
    best = rows[1].split(",")
    assert (f"Lowest validation loss: job {best[0]} ({best[2]}), {losses[0]:.4f}. Ask it questions: python -m "
            f"sft_recipes.chat run_dir={sweep / best[0]}") in r.stdout
    assert (sweep / "summary.png").stat().st_size > 1000
    (sweep / "summary.csv").unlink()
    again = subprocess.run([sys.executable, "-m", "sft_recipes.sweep_report", str(sweep)], capture_output=True,
                           text=True, cwd=ROOT)
    assert again.returncode == 0 and (sweep / "summary.csv").exists() and "lora.r=8" in again.stdout


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    raw = yaml.safe_load(path.read_text())
    header = path.read_text().splitlines()[:4]
    assert any(f"accelerate launch --config_file recipes/accelerate/{path.name} -m sft_recipes" in h for h in header)
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type.value == raw["distributed_type"] and config.num_processes >= 2


def test_the_yaml_sweep_recipe_composes():
    from hydra import compose, initialize_config_dir
    import shutil
    import tempfile

    from sft_recipes import conf_dir, config

    config.register()
    tmp = Path(tempfile.mkdtemp()) / "conf"
    shutil.copytree(conf_dir(), tmp)
    shutil.copy(ROOT / "recipes" / "sweep_lora_rank_lr.yaml", tmp)
    with initialize_config_dir(str(tmp), version_base="1.3"):
        cfg = compose("sweep_lora_rank_lr", overrides=["output_dir=/tmp/x"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == {"lora.r": "8,32", "train.lr": "1e-4,4e-4"}
    # the jobs that the sweep's config check (sweep_report.jobs, before the first job trains) composes
    from sft_recipes.sweep_report import jobs

    assert sorted(map(sorted, jobs(cfg))) == sorted(sorted([f"lora.r={r}", f"train.lr={lr}", "output_dir=/tmp/x"])
                                                    for r in (8, 32) for lr in ("0.0001", "0.0004"))


def test_optuna_search_minimizes_the_validation_loss(tmp_path, tiny_dir):
    sweep = tmp_path / "search"
    args = [a for a in tiny_args(tiny_dir, "unused", "train.max_steps=2", "train.save_steps=1")
            if not a.startswith(("hydra.run.dir", "preset="))]
    r = cli("--config-dir", str(ROOT / "recipes"), "--config-name", "optuna_search", "-m", *args,
            "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"lora.r", "lora.alpha", "train.lr"} and best["best_value"] < 11
    assert (sweep / "summary.md").exists()
