"""Evaluate, chat and merge: metrics against hand-computed cases, each command end to end on the tiny model,
and once on the embedded model (the adapter must beat the base model)."""
import contextlib
import copy
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import QWEN3_LIKE, ROOT, TRAIN, VAL
from sft_recipes import chat, data, evaluate, merge, runs
from sft_recipes.errors import UserError


def test_metrics_against_hand_computed_cases():
    s = evaluate.scores("the cat sat on the mat", "the cat is on the mat")
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6 tokens each way; SQuAD F1 drops articles: 3 of 4 each way
    assert s["rouge_l"] == pytest.approx(5 / 6, abs=1e-4)
    assert s["token_f1"] == pytest.approx(0.75, abs=1e-4) and s["exact_match"] == 0
    assert evaluate.scores("The cat sat!", "the cat sat") == pytest.approx(
        {"rouge_l": 1.0, "token_f1": 1.0, "exact_match": 1.0})
    assert evaluate.scores("", "a variance") == {"rouge_l": 0.0, "token_f1": 0.0, "exact_match": 0.0}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dir):
    """A QLoRA run on the tiny model through the CLI, evaluated after training."""
    out = tmp_path_factory.mktemp("tiny_run")
    r = subprocess.run([sys.executable, "-m", "sft_recipes", f"model.name_or_path={tiny_dir}", "model.embedded=null",
                        "preset=fast_test", f"data.train_path={TRAIN}", f"data.val_path={VAL}", "train.max_steps=3",
                        "train.report_to=[]", "eval.after_train=true", "eval.limit=3", "eval.max_new_tokens=8",
                        f"hydra.run.dir={out}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Evaluation (base -> fine-tuned): loss" in r.stdout
    # no terminal: no progress bars (no carriage returns), a line per log with the steps done
    assert "\r" not in r.stdout + r.stderr and re.search(r"^step=3 epoch=\S+ loss=.* \[3/3\]$", r.stdout, re.M)
    return out


def test_evaluate_after_train_writes_the_report(tiny_run):
    m = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    assert m["records"] == 3
    for side in ("base", "fine_tuned"):
        assert set(m[side]) == {"loss", "perplexity", "rouge_l", "token_f1", "exact_match", "stopped_at_end_of_turn",
                                "words"}
        assert m[side]["perplexity"] == pytest.approx(2.718281828 ** m[side]["loss"], rel=1e-3)
    preds = [json.loads(line) for line in (tiny_run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and {"question", "reference", "base", "fine_tuned"} <= set(preds[0])
    for side, key in (("base", "base"), ("fine_tuned", "fine_tuned"), (None, "reference")):  # mean words per answer
        mean_words = round(sum(len(p[key].split()) for p in preds) / 3, 1)
        assert (m[side]["words"] if side else m["reference_words"]) == mean_words
    report = (tiny_run / "eval" / "report.md").read_text()
    assert "| rouge l |" in report and f"| answer length, words (references: {m['reference_words']}) |" in report
    assert (tiny_run / "eval" / "metrics.png").stat().st_size > 1000


def test_chat_one_shot_and_interactive(tiny_run):
    one = subprocess.run([sys.executable, "-m", "sft_recipes.chat", f"run_dir={tiny_run}", "prompt=What is a mean?",
                          "max_new_tokens=5", "repetition_penalty=1.2", "system=Be brief."], capture_output=True,
                         text=True, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    from sft_recipes.chat import sampling_args  # what generate gets: greedy unless sampled, a penalty only if set

    assert sampling_args(repetition_penalty=1.2) == {"do_sample": False, "repetition_penalty": 1.2}
    assert sampling_args(0.7, 0.9) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    saved = tiny_run / "chats.jsonl"
    inter = subprocess.run([sys.executable, "-m", "sft_recipes.chat", f"run_dir={tiny_run}", "max_new_tokens=4"],
                           input=f"/save {saved}\nWhat is a mean?\n/reset\nAnd a median?\nAnd a mode?\n/save {saved}\n"
                                 "/save\n/exit\n", capture_output=True, text=True, cwd=ROOT)
    assert inter.returncode == 0, inter.stderr[-2000:]
    assert inter.stdout.count("you> ") == 8 and inter.stdout.count("model> ") == 3 and "(history cleared)" in inter.stdout
    assert "(nothing to save yet)" in inter.stdout and f"(saved 2 exchanges to {saved}" in inter.stdout
    assert "(usage: /save FILE)" in inter.stdout
    (line,) = saved.read_text().splitlines()  # /save: a chat transcript, to train on once its replies are right
    turns = json.loads(line)["messages"]
    assert [(t["role"], t["content"]) for t in turns[::2]] == [("user", "And a median?"), ("user", "And a mode?")]
    saved.write_text(json.dumps({"messages": [{**t, "content": t["content"] or "A fixed reply."} for t in turns]}))
    (record,) = data.load_records(saved)
    assert (record.history[0][0], record.question, record.system, record.answer[:1] != "") == (
        "And a median?", "And a mode?", None, True)
    bad = subprocess.run([sys.executable, "-m", "sft_recipes.chat", "run_dir=/nowhere"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr == "error: run_dir=/nowhere: no such folder.\n"


class Terminal:
    """`python -m sft_recipes.chat ARGS` on a pseudo-terminal, as a person at a terminal runs it."""

    def __init__(self, *args: str):
        import os
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            import signal

            # Ctrl-C at a terminal interrupts: a shell without job control starts background jobs (a CI runner's,
            # `cmd &` in a script) with SIGINT ignored, which the child would inherit and never see the Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "sft_recipes.chat", *args],
                      {**os.environ, "TERM": "xterm"})  # (readline's echo as an xterm gets it, whatever CI's TERM is)
        self.out = b""

    def until(self, text: bytes, times: int = 1, timeout: float = 120, more: int = 0) -> None:
        """Read until `text` has been printed `times` times, and `more` bytes after it."""
        import os
        import select
        import time

        end = time.time() + timeout
        while (self.out.count(text) < times or len(self.out) - self.out.rfind(text) - len(text) < more) and \
                time.time() < end:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.fd, 4096)
                except OSError:  # the child has exited
                    return

    def type(self, keys: bytes) -> None:
        import os

        os.write(self.fd, keys)

    def exit_code(self) -> int:
        import os

        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_chat_in_a_terminal_edits_lines_and_recalls_questions(tiny_run):
    """In a terminal, input() has line editing: the up arrow brings back the last question, backspace edits it."""
    term = Terminal(f"run_dir={tiny_run}", "max_new_tokens=2")
    term.until(b"you> ")
    term.type(b"What is a mean?\r")
    term.until(b"you> ", 2)  # answered
    term.type(b"\x1b[A" + b"\x7f" * 5 + b"median?\r")  # up arrow, 5 backspaces over "mean?", then "median?"
    term.until(b"you> ", 3)
    term.type(b"/exit\r")
    assert term.exit_code() == 0, term.out[-2000:]
    assert b"What is a mean?" + b"\x08\x1b[K" * 5 + b"median?" in term.out and b"^[[A" not in term.out


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(tiny_run):
    term = Terminal(f"run_dir={tiny_run}", "max_new_tokens=900", "stop_loops=false")  # (the tiny model loops at once)
    term.until(b"you> ")
    term.type(b"What is a mean?\r")
    term.until(b"model> ", more=20)  # some words of the answer
    term.type(b"\x03")  # Ctrl-C
    term.until(b"you> ", 2)
    term.type(b"And a median?\r")
    term.until(b"model> ", 2)
    term.type(b"\x03")  # at once: before or as the answer begins
    term.until(b"you> ", 3)
    term.type(b"/exit\r")
    assert term.exit_code() == 0, term.out[-2000:]
    assert term.out.count(b" [stopped]\r\nyou> ") == 2, term.out[-2000:]


@pytest.mark.parametrize("edge", ["model> ", "end of the answer"])
def test_ctrl_c_at_the_edges_of_an_answer_stops_that_answer_not_the_chat(tiny_run, monkeypatch, capsys, edge):
    """A Ctrl-C comes between any two steps: one that lands as "model> " is written (a person who pressed it as the
    answer began), or as a finished answer's line ends, stops that answer as one during it does; the chat goes on.
    (Through the pseudo-terminal above this is a race; here the interrupt is raised at that step.)"""
    import builtins

    questions = iter(["What is a mean?", "And a median?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(questions))
    real_print, raised = builtins.print, []

    def print_then_interrupt(*args, **kwargs):
        real_print(*args, **kwargs)
        if not raised and (args == ("model> ",) if edge == "model> " else args == () and "end" not in kwargs):
            raised.append(args)
            raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "print", print_then_interrupt)
    try:
        chat._cli([f"run_dir={tiny_run}", "max_new_tokens=3"])
    except KeyboardInterrupt:  # (uncaught, it would stop the test session)
        pytest.fail(f"the Ctrl-C {edge!r} ended the chat")
    out = capsys.readouterr().out
    assert raised and out.count(" [stopped]\n") == 1 and out.count("model> ") == 2, out


@pytest.mark.parametrize("reasoning", ["", "Recall the definition."])
def test_a_reasoning_block_is_no_part_of_the_answer_shown_or_scored(tokenizer, tmp_path, reasoning):
    """A model fine-tuned on plain answers with Qwen3's chat template writes the empty reasoning block that the
    template put before every trained answer ("<think>\\n\\n</think>\\n\\n"). Chat streams the answer from its first
    word without that block (a block with reasoning in it streams as it comes), and the answer that chat keeps,
    evaluate scores and answer files hold is what follows the block. Pieces as a streamer passes them on: one
    decoded token at a time."""
    from sft_recipes import card, prepare, templates
    from sft_recipes.chat import Shown

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN3_LIKE
    end = prepare.reasoning_end(tok)
    assert end == "</think>" and prepare.reasoning_end(tokenizer) is None  # (SmolLM2's template writes none)
    ds, _ = prepare.tokenize(data.load_records(TRAIN)[:1], tok, templates.get("chat"), 512)
    trained = tok.decode([i for i, label in zip(ds[0]["input_ids"], ds[0]["labels"]) if label != -100])
    assert trained.startswith("<think>\n\n</think>\n\n")  # what the model learns to write before each answer

    reply = f"<think>\n{reasoning}\n</think>\n\nA p-value is a probability."
    streamed = []
    shown = Shown(streamed.append, end)
    for token in tok(reply, add_special_tokens=False)["input_ids"]:
        shown(tok.decode([token]))
    shown.close()
    expected = f"<think>\n{reasoning}\n</think>\n\n" if reasoning else ""
    assert "".join(streamed) == expected + "A p-value is a probability."
    assert prepare.answer_of(reply, end) == "A p-value is a probability."
    assert prepare.answer_of(reply, None) == reply  # (a template without reasoning blocks: the reply as written)
    tok.save_pretrained(tmp_path / "adapter")  # the model card's code prints the answer alone too
    *_, printed = card.answer_lines(tmp_path / "adapter", merged=False)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        exec(printed, {"reply": reply})
    assert said.getvalue() == "A p-value is a probability.\n"

    for unfinished in ("<think>\n", "\n<thi"):  # a reply cut short inside what could be the block: shown as it is
        streamed = []
        shown = Shown(streamed.append, end)
        shown(unfinished)
        assert streamed == []
        shown.close()
        assert streamed == [unfinished.lstrip()]


class Says:
    """A logits processor that makes a model write `reply`'s tokens, then its end-of-turn token, and keeps the
    prompts it was given (as text): generate's own hook, on a real model."""

    def __init__(self, tok, reply: str):
        self.tok, self.prompts = tok, []
        self.ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]

    def __call__(self, input_ids, scores):
        if not self.prompts:  # the first step: the prompts alone
            self.start = input_ids.shape[1]
            self.prompts = [self.tok.decode(row, skip_special_tokens=False) for row in input_ids]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(input_ids.shape[1] - self.start, len(self.ids) - 1)]] = 0.0
        return forced


def test_a_base_model_that_can_answer_without_reasoning_is_evaluated_so(tiny_run, tiny_dir, tmp_path, capsys):
    """Qwen3 reasons before it answers unless its chat template's enable_thinking is False: its reasoning would fill
    evaluate's max_new_tokens, and the base model's answers would be cut before they begin. Evaluate asks the base
    model with that switch off (its prompt then ends with an empty reasoning block), and says so; the fine-tuned model
    is asked as chat asks it, and the reasoning block it writes is no part of its answer. Chat's base=true, there to
    compare, asks as evaluate does."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from sft_recipes import prepare

    tok = runs.tokenizer(tiny_run)
    tok.chat_template = QWEN3_LIKE
    assert prepare.thinking_off(tok) == {"enable_thinking": False}
    assert prepare.thinking_off(runs.tokenizer(tiny_run)) == {}  # (SmolLM2's template has no such switch)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    questions = [[{"role": "user", "content": q}] for q in ("What is a p-value?", "What is a mean?")]
    for chat_args, prompt_end in (({}, "<|im_start|>assistant\n"),
                                  (prepare.thinking_off(tok), "<|im_start|>assistant\n<think>\n\n</think>\n\n")):
        says = Says(tok, "<think>\n\n</think>\n\nA p-value is a probability.")
        answers = runs.generate(model, tok, questions, max_new_tokens=30, chat_args=chat_args,
                                sampling={"do_sample": False, "logits_processor": LogitsProcessorList([says])})
        assert answers == [("A p-value is a probability.", True)] * 2
        assert [p.endswith(prompt_end) for p in says.prompts] == [True, True], says.prompts
        says = Says(tok, "<think>\n\n</think>\n\nA p-value is a probability.")  # chat's answer, asked alike
        assert chat.answer(model, tok, questions[0], 30, chat_args=chat_args, sampling={
            "do_sample": False, "logits_processor": LogitsProcessorList([says])}) == "A p-value is a probability."
        assert says.prompts[0].endswith(prompt_end), says.prompts

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoint-*", "eval*"))
    tok.save_pretrained(run / "final_model")
    m = evaluate.evaluate(run, max_new_tokens=4, limit=2)
    assert m["base_asked_with"] == {"enable_thinking": False}
    said = "the base model asked with its chat template's enable_thinking=False, answering without reasoning first"
    assert said in (run / "eval" / "report.md").read_text() and said in (run / "final_model" / "README.md").read_text()
    assert "base_asked_with" not in json.loads((tiny_run / "eval" / "metrics.json").read_text())
    capsys.readouterr()
    for base, note in (("true", True), ("false", False)):
        chat._cli([f"run_dir={run}", f"base={base}", "prompt=What is a p-value?", "max_new_tokens=3"])
        assert ("the base model is asked with its chat template's enable_thinking=False, as evaluate asks it"
                in capsys.readouterr().err) == note


def test_loop_start_finds_where_an_answer_begins_to_repeat_itself():
    from sft_recipes.chat import loop_start

    sentence = list(range(100, 120))  # 20 tokens
    assert loop_start([1, 2] + sentence * 3) == 22  # three copies in a row: the answer keeps the first
    assert loop_start([1, 2] + sentence * 2) is None  # two are not a loop yet
    assert loop_start([1] + [7] * 32) == 2 and loop_start([1] + [7] * 31) is None  # a short block: 32 tokens in all
    assert loop_start([1, 2, 3] * 10) is None and loop_start([1, 2, 3] * 11) == 3
    assert loop_start(list(range(300))) is None and loop_start([]) is None


def test_chat_stops_an_answer_that_repeats_itself(tiny_run, monkeypatch, capsys):
    """The random tiny model falls into a loop at once: the answer stops there and keeps one copy, with a note (one
    answer: on stderr; in the conversation: after the streamed text); stop_loops=false lets it run on."""
    import builtins

    ask = [f"run_dir={tiny_run}", "prompt=What is a mean?", "max_new_tokens=300"]
    chat._cli(ask)
    stopped = capsys.readouterr()
    chat._cli([*ask, "stop_loops=false"])
    whole = capsys.readouterr().out.strip()
    assert "note: the answer was repeating itself: stopped; repetition_penalty=1.1" in stopped.err
    assert whole.startswith(stopped.out.strip()) and len(stopped.out.strip()) < len(whole) / 3, (stopped, whole)
    questions = iter(["What is a mean?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(questions))
    chat._cli(ask[:1] + ask[2:])
    assert " [repeating itself: stopped; " in capsys.readouterr().out


def test_relative_paths_of_a_run_are_found_from_another_folder(tmp_path, monkeypatch):
    """evaluate/chat/merge run from another folder than training: the run's relative paths meant the launch folder."""
    from omegaconf import OmegaConf

    from sft_recipes import runs
    from test_config import make

    launch, run, elsewhere = tmp_path / "project", tmp_path / "project" / "outputs" / "run", tmp_path / "elsewhere"
    for folder in (run / ".hydra", elsewhere):
        folder.mkdir(parents=True)
    (launch / "qa.json").write_text("[]")
    (launch / "mine.yaml").write_text("[]")
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(launch)}}}, run / ".hydra" / "hydra.yaml")
    cfg = make("data.train_path=qa.json", "data.template_files=[mine.yaml]", "data.val_path=auto")
    monkeypatch.chdir(elsewhere)
    runs.from_launch_dir(cfg, run)
    assert cfg.data.train_path == str(launch / "qa.json") and list(cfg.data.template_files) == [str(launch / "mine.yaml")]
    assert cfg.data.val_path == "auto" and cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (elsewhere / "qa.json").write_text("[]")  # a file of that name here is the one meant
    cfg = make("data.train_path=qa.json")
    runs.from_launch_dir(cfg, run)
    assert cfg.data.train_path == "qa.json"


def test_run_dir_latest_is_the_newest_finished_run(tiny_run, tmp_path, monkeypatch):
    """run_dir=latest (make chat/eval/merge without RUN): the run under ./outputs whose final_model/ was saved last;
    a run without final_model/ (a dry run, one still training) is not one."""
    import os

    from sft_recipes import runs

    (tmp_path / "outputs").mkdir()
    with pytest.raises(UserError, match="run_dir=latest: no finished run under"):
        runs.latest(str(tmp_path / "outputs"))
    (tmp_path / "outputs" / "2026-01-01_00-00-00").symlink_to(tiny_run)
    (tmp_path / "outputs" / "2026-12-31_00-00-00").mkdir()  # started later, not finished
    (tmp_path / "outputs" / "2025-01-01_00-00-00" / "final_model").mkdir(parents=True)
    (tmp_path / "outputs" / "2025-01-01_00-00-00" / "final_model" / "COMPLETE").touch()
    os.utime(tmp_path / "outputs" / "2025-01-01_00-00-00" / "final_model" / "COMPLETE", (0, 0))  # finished long ago
    one = subprocess.run([sys.executable, "-m", "sft_recipes.chat", "run_dir=latest", "prompt=What is a mean?",
                          "max_new_tokens=3"], capture_output=True, text=True, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "run_dir=latest: outputs/2026-01-01_00-00-00" in one.stderr
    # the folder of runs rather than one of them, and a folder that is not there
    (tmp_path / "outputs" / "2026-12-31_00-00-00" / ".hydra").mkdir()
    (tmp_path / "outputs" / "2026-12-31_00-00-00" / ".hydra" / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(UserError, match=r"outputs is not a run dir: .* It holds 2 run\(s\): give one, e.g. the newest: "
                                        r"run_dir=.*outputs/2026-12-31_00-00-00 \(or run_dir=latest"):
        runs.config(tmp_path / "outputs")
    with pytest.raises(UserError, match=rf"^run_dir=nope: no such folder \(from {tmp_path}\)\.$"):
        monkeypatch.chdir(tmp_path)
        runs.config("nope")


def test_chat_samples_with_a_seed_and_talks_to_the_base_model(tiny_run, capsys):
    from sft_recipes import chat

    sampled = []
    for _ in range(2):
        chat._cli([f"run_dir={tiny_run}", "prompt=What is a mean?", "max_new_tokens=12", "temperature=1.5", "seed=3"])
        sampled.append(capsys.readouterr().out)
    chat._cli([f"run_dir={tiny_run}", "prompt=What is a mean?", "max_new_tokens=12"])
    greedy = capsys.readouterr().out
    assert sampled[0] == sampled[1] != greedy  # the same seed, the same sample; not the greedy answer
    with pytest.raises(UserError, match="temperature must be >= 0"):
        chat._cli([f"run_dir={tiny_run}", "temperature=-1"])
    base = subprocess.run([sys.executable, "-m", "sft_recipes.chat", f"run_dir={tiny_run}", "base=true",
                           "max_new_tokens=4"], input="/exit\n", capture_output=True, text=True, cwd=ROOT)
    assert base.returncode == 0 and "Chat with the base model" in base.stdout, base.stderr[-2000:]


def test_chat_gives_the_source_a_template_names(tiny_run, tmp_path, capsys):
    """data.template=chat_with_source puts the source in the prompt: chat says so and takes source="..."."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("merged", "eval*", "checkpoint-*"))
    config = run / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("template: chat\n", "template: chat_with_source\n"))
    chat._cli([f"run_dir={run}", "prompt=What is a mean?", "max_new_tokens=2"])
    assert "note: this run's prompts name a source (data.template=chat_with_source: 'Source: {source}" \
        in capsys.readouterr().err
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "What is a mean?"}\n{"question": "And a mode?", "source": "Ch. 2"}\n')
    chat._cli([f"run_dir={run}", f"questions={questions}", "source=Ch. 1", "max_new_tokens=2"])
    assert "note:" not in capsys.readouterr().err
    answers = [json.loads(line) for line in (run / "answers_q.jsonl").read_text().splitlines()]
    assert [a["source"] for a in answers] == ["Ch. 1", "Ch. 2"]  # a record's own source comes first


def test_chat_names_a_system_prompt_that_the_chat_template_refuses(tiny_run, tmp_path):
    """chat system="..." with a run whose chat template takes no system message (Gemma 2's): one paragraph, status 2,
    before any model loads."""
    import shutil

    from test_templates import NO_SYSTEM_TEMPLATE

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("merged", "eval*", "checkpoint-*"))
    (run / "final_model" / "chat_template.jinja").write_text(NO_SYSTEM_TEMPLATE)
    r = subprocess.run([sys.executable, "-m", "sft_recipes.chat", f"run_dir={run}", "system=Be brief.", "prompt=Hi?"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: The chat template refused system='Be brief.': System role not supported. This model's chat template "
        "takes no system message: ask without system=."), r.stderr[-2000:]


def test_merge_onto_a_full_disk_says_so_and_keeps_the_run(tiny_run, small_disk):
    """A run on a real small file system (tmpfs) that the merged model does not fit on: one paragraph naming its
    size, nothing written, the run as it was."""
    disk = small_disk("32m")
    run = disk / "run"
    shutil.copytree(tiny_run, run, ignore=lambda d, names: [n for n in names if n.startswith(("checkpoint-", "eval",
                                                                                               "merged", "runs"))])
    (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 2**19))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=rf"No space left to write {run}/merged \(the merged model takes about "
                                        rf"0.0\d GiB in bfloat16\): free space in {run}'s disk. Nothing was written.$"):
        merge.merge(run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_merge_gives_a_plain_model_with_the_adapters_logits(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_recipes import runs

    report = merge.merge(tiny_run, dtype="float32")
    assert report["merged_into"] == "de-quantized 4-bit weights" and report["relative_difference"] < 0.01
    plain = AutoModelForCausalLM.from_pretrained(tiny_run / "merged", dtype=torch.float32)
    assert not isinstance(plain, PeftModel) and getattr(plain.config, "quantization_config", None) is None
    assert plain.generation_config.eos_token_id == 2  # <|im_end|>, the end of a reply (prepare.stop_ids)
    cfg = runs.config(tiny_run)
    adapted = runs.adapter_model(cfg, tiny_run)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198, 1780, 314]])
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits.float(), plain(input_ids=ids).logits
    assert (a - m).abs().max() / a.abs().max() < 0.02  # bf16 compute in the 4-bit adapter vs float32 merged


def test_an_int8_run_validates_as_it_trains_and_merges_into_its_de_quantized_weights(tmp_path, tiny_dir):
    """quantization=int8 end to end: the run (its validation as training computes, no bitsandbytes line per layer),
    then merge, into the 8-bit weights de-quantized."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "int8"
    r = subprocess.run([sys.executable, "-m", "sft_recipes", f"model.name_or_path={tiny_dir}", "model.embedded=null",
                        "quantization=int8", "preset=fast_test", f"data.train_path={TRAIN}", f"data.val_path={VAL}",
                        "train.max_steps=2", "train.report_to=[]", f"hydra.run.dir={run}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval_loss" in r.stdout and "MatMul8bitLt" not in r.stdout + r.stderr
    report = merge.merge(run, dtype="float32", limit=2)
    assert report["merged_into"] == "de-quantized 8-bit weights" and report["relative_difference"] < 0.01
    plain = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    assert not isinstance(plain, PeftModel) and getattr(plain.config, "quantization_config", None) is None


def test_a_4bit_gpt2_merges_into_its_own_layer_types(tmp_path, tokenizer):
    """GPT-2's linear layers are Conv1D (weights stored transposed); de-quantized 4-bit layers come back as
    nn.Linear, and merged/ held their weights the wrong way round (its load refused their shapes)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "sft_recipes", f"model.name_or_path={base}", "model.embedded=null",
                        "preset=fast_test", f"data.train_path={TRAIN}", f"data.val_path={VAL}", "train.max_steps=2",
                        "train.lr=2e-3", "train.report_to=[]", "lora.target_modules=[c_attn,c_proj]",
                        f"hydra.run.dir={run}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = merge.merge(run, dtype="float32", limit=4)
    assert report["relative_difference"] < 0.01
    plain = GPT2LMHeadModel.from_pretrained(run / "merged", dtype=torch.float32)
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)
    adapted = runs.adapter_model(runs.config(run), run)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198, 1780, 314]])
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits.float(), plain(input_ids=ids).logits
    assert (a - m).abs().max() / a.abs().max() < 0.02


def card_code_runs(card: str) -> str:
    """Run the card's Python example as written (fewer new tokens); returns what it printed."""
    code = card.split("```python\n")[1].split("```")[0].replace("max_new_tokens=256", "max_new_tokens=4")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, (code, r.stderr[-3000:])
    return r.stdout


def test_model_cards_describe_the_run_and_their_code_runs(tiny_run):
    import yaml

    assert not (tiny_run / "README.md").exists()  # TRL's draft card (base model "None") is not written
    card = (tiny_run / "final_model" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "qlora" in meta["tags"]
    assert "base_model" not in meta  # a local folder is not a hub id
    assert "| best validation loss |" in card and "| rouge l |" in card  # evaluate (after train) added its table
    assert "r=16, alpha=32" in card and "4-bit NF4" in card and "load_in_4bit=True" in card
    assert str(tiny_run / "final_model") in card and "batch 2 x 1 accumulation" in card
    card_code_runs(card)

    merge.merge(tiny_run, limit=2)
    merged = (tiny_run / "merged" / "README.md").read_text()
    assert yaml.safe_load(merged.split("---")[1])["library_name"] == "transformers"
    assert "merged vs adapter validation loss" in merged and "PeftModel" not in merged
    card_code_runs(merged)


def test_evaluate_on_a_test_file_counts_questions_seen_in_training(tiny_run, tmp_path, capsys):
    trained = json.loads(TRAIN.read_text())[0]
    test = tmp_path / "exam.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is the range of a data set?", "answer": "The largest value minus the smallest."},
        {"question": trained["question"], "answer": trained["answer"]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is a mean?"}, {"role": "assistant", "content": "The average."},
                      {"role": "user", "content": "And a median?"}, {"role": "assistant", "content": "The middle."}]}]))
    evaluate._cli([f"run_dir={tiny_run}", f"data={test}", "max_new_tokens=4"])
    out, err = capsys.readouterr()
    assert "warning: 1 of the 3 questions in" in out and f"Report: {tiny_run / 'eval_exam' / 'report.md'}" in out
    m = json.loads((tiny_run / "eval_exam" / "metrics.json").read_text())
    assert m["data"] == str(test) and m["records"] == 3 and m["also_in_training"] == 1
    cut = "2 of the 3 reference answers are longer than max_new_tokens=4 tokens"  # ("The middle." and <|im_end|>: 4)
    assert f"warning: {cut}" in err and m["references_cut"].startswith(cut)
    assert f"Note: {cut}" in (tiny_run / "eval_exam" / "report.md").read_text()
    predictions = [json.loads(line) for line in (tiny_run / "eval_exam" / "predictions.jsonl").open()]
    assert [p["question"] for p in predictions] == ["What is the range of a data set?", trained["question"],
                                                    "And a median?"]  # a conversation: its last question, asked
    assert predictions[2]["history"][1] == {"role": "assistant", "content": "The average."}  # after the earlier turns
    assert predictions[2]["system"] == "Be brief." and "system" not in predictions[0]  # a transcript's own, asked with
    assert "> system: Be brief.\n> user: What is a mean?\n> assistant: The average.\n\n**Q:** And a median?" in (
        tiny_run / "eval_exam" / "report.md").read_text()
    card = (tiny_run / "final_model" / "README.md").read_text()
    assert "questions of the validation split" in card  # eval/ (after train) stays,
    assert f"On 3 questions from `{test}`; 1 of them also in the training data" in card  # and the file's is added
    with pytest.raises(UserError, match="does not exist"):
        evaluate.evaluate(tiny_run, data=str(tmp_path / "missing.json"))


def test_generate_leaves_the_tokenizer_as_it_was(tiny_run):
    """Batched generation pads on the left; the tokenizer it is given (the trainer's, for eval.samples) keeps its
    own padding side."""
    from sft_recipes import runs

    cfg, tok = runs.config(tiny_run), runs.tokenizer(tiny_run)
    tok.padding_side = "right"
    answers = runs.generate(runs.adapter_model(cfg, tiny_run), tok, [runs.messages(cfg, "What is a mean?"),
                                                                     runs.messages(cfg, "And a median?")], 2)
    assert len(answers) == 2 and tok.padding_side == "right"


def test_prompts_at_inference_show_the_source_as_training_did():
    from test_config import make
    from sft_recipes import runs

    cfg = make("data.template=chat_with_source", "data.system_prompt=Be brief.")
    assert runs.messages(cfg, "What is a mean?", source="Ch. 2") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Source: Ch. 2\n\nWhat is a mean?"}]
    assert runs.messages(cfg, "Q?", system="Be long.")[0] == {"role": "system", "content": "Be long."}  # a record's own
    earlier = [{"role": "user", "content": "What is a mode?"}, {"role": "assistant", "content": "The commonest."}]
    assert runs.messages(cfg, "And a mean?", earlier, "Ch. 2") == [  # every user turn as the template writes it
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Source: Ch. 2\n\nWhat is a mode?"},
        earlier[1], {"role": "user", "content": "Source: Ch. 2\n\nAnd a mean?"}]


def test_chat_answers_a_file_of_questions(tiny_run, tmp_path, capsys):
    from sft_recipes import chat

    questions = tmp_path / "exam.jsonl"
    questions.write_text('{"question": "What is a mean?"}\n{"question": "What is a median?", "source": "Ch. 2"}\n')
    chat._cli([f"run_dir={tiny_run}", f"questions={questions}", "max_new_tokens=4", "batch_size=1"])
    out, err = capsys.readouterr()
    assert f"2 answers (fine-tuned model): {tiny_run / 'answers_exam.jsonl'}" in out
    assert re.search(r"^questions: 1/2 answers, .* left\nquestions: 2/2 answers$", err, re.M)  # (not a terminal)
    rows = [json.loads(line) for line in (tiny_run / "answers_exam.jsonl").read_text().splitlines()]
    assert [(r["question"], r["source"]) for r in rows] == [("What is a mean?", ""), ("What is a median?", "Ch. 2")]
    assert all(isinstance(r["answer"], str) and isinstance(r["stopped_at_end_of_turn"], bool) for r in rows)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is a mean?"}\n{"prompt": "x"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 2: field 'question' is missing.*'answer' and 'source' "
                                        r"are optional strings\)\. \(The questions are read from") as e:
        chat._cli([f"run_dir={tiny_run}", f"questions={bad}"])
    assert "data.columns" not in str(e.value)  # no data.columns to set here
    renamed = {"question": "Q", "answer": "A", "source": "S"}  # a run trained on a file with other column names
    assert [r.question for r in runs.load_files(str(questions), renamed, ["question"])] == ["What is a mean?", "What is a median?"]
    with pytest.raises(UserError, match="read from the run's question column, 'Q', or from 'question'"):
        runs.load_files(str(bad), renamed, ["question"])
    with pytest.raises(UserError, match="is one of the question files"):
        chat._cli([f"run_dir={tiny_run}", f"questions={questions}", f"out={questions}"])
    assert questions.read_text().startswith('{"question": "What is a mean?"}')  # untouched


def test_a_test_file_is_read_with_the_runs_column_names_or_the_plain_ones(tmp_path):
    """A run trained on prompt/response columns evaluates a file with question/answer ones; errors name both ways
    and no data.columns, which evaluate does not take."""
    renamed = {"question": "prompt", "answer": "response", "source": "source"}
    theirs, plain, bad = tmp_path / "theirs.csv", tmp_path / "plain.csv", tmp_path / "bad.csv"
    theirs.write_text("prompt,response\nWhat is a mean?,The average.\n")
    plain.write_text("question,answer\nWhat is a mean?,The average.\n")
    bad.write_text("question,reply\nWhat is a mean?,The average.\n")
    for f in (theirs, plain):
        assert [(r.question, r.answer) for r in runs.load_files(str(f), renamed)] == [("What is a mean?", "The average.")]
    with pytest.raises(UserError, match=r"bad.csv: row 1: field 'prompt' is missing.* \(The records are read from the "
                                        r"run's question and answer columns, 'prompt' and 'response', or from "
                                        r"'question' and 'answer' in a file that has none of those\.\)$") as e:
        runs.load_files(str(bad), renamed)
    assert "data.columns" not in str(e.value)


def test_gguf_needs_a_base_that_came_as_gguf(tiny_run):
    with pytest.raises(UserError, match="gguf=q5_k: use one of f32, f16, bf16, q8_0, q4_1, q4_0"):
        merge.merge(tiny_run, gguf="q5_k")
    with pytest.raises(UserError, match="did not come as one.*convert_hf_to_gguf.py"):
        merge.merge(tiny_run, gguf="q8_0")


def test_cli_arguments_are_checked(tiny_run):
    with pytest.raises(UserError, match=r"Unknown argument 'max_tokens=3' \(did you mean max_new_tokens\?\)"):
        evaluate._cli([f"run_dir={tiny_run}", "max_tokens=3"])
    with pytest.raises(UserError, match=r"Unknown argument 'question=What is a mean\?' \(did you mean prompt\?\)"):
        chat._cli([f"run_dir={tiny_run}", "question=What is a mean?"])
    with pytest.raises(UserError, match="limit=x: expected int"):
        evaluate._cli([f"run_dir={tiny_run}", "limit=x"])
    for arg, message in [("limit=-1", "limit=-1 must be 0 or positive"), ("max_new_tokens=0", "must be positive"),
                         ("batch_size=0", "batch_size=0 must be positive"),
                         ("repetition_penalty=0", r"repetition_penalty=0.0: it must be positive \(1: none")]:  # (limit=-1 left out the last record)
        with pytest.raises(UserError, match=message):
            evaluate._cli([f"run_dir={tiny_run}", arg])
    # the adapter's folder stands for its run
    from sft_recipes.runs import parse_args

    assert parse_args([f"run_dir={tiny_run / 'final_model'}"], evaluate.DEFAULTS, "")["run_dir"] == str(tiny_run)


def test_evaluate_and_chat_take_a_checkpoint(tiny_run, tmp_path, capsys):
    from sft_recipes import chat
    from sft_recipes.resume import last_checkpoint
    from sft_recipes.runs import parse_args

    checkpoint = last_checkpoint(tiny_run)
    assert checkpoint.name == "checkpoint-3"  # the last step's: the same weights as final_model
    card = (tiny_run / "final_model" / "README.md").read_bytes()
    evaluate._cli([f"run_dir={checkpoint}", "limit=3", "max_new_tokens=8"])  # as eval.after_train did
    assert f"Report: {tiny_run / 'eval_checkpoint-3' / 'report.md'}" in capsys.readouterr().out
    at_checkpoint = json.loads((tiny_run / "eval_checkpoint-3" / "metrics.json").read_text())
    final = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    assert at_checkpoint["adapter"] == "checkpoint-3" and final["adapter"] == "final_model"
    assert {k: at_checkpoint[k] for k in ("base", "fine_tuned")} == {k: final[k] for k in ("base", "fine_tuned")}
    assert "at checkpoint-3" in (tiny_run / "eval_checkpoint-3" / "report.md").read_text()
    assert (tiny_run / "final_model" / "README.md").read_bytes() == card  # the card is final_model's alone,
    from sft_recipes import card as model_card, runs

    assert model_card.render(tiny_run, runs.config(tiny_run)) == card.decode()  # also when it is written again
    assert "| saved weights | step 3 of 3 |" in card.decode() and "| rouge l |" in card.decode()
    questions = tmp_path / "new.jsonl"
    questions.write_text('{"question": "What is a mean?"}\n')
    chat._cli([f"run_dir={checkpoint}", f"questions={questions}", "max_new_tokens=4"])
    assert len((tiny_run / "answers_new_checkpoint-3.jsonl").read_text().splitlines()) == 1
    with pytest.raises(UserError, match=f"run_dir={checkpoint} is a checkpoint; merge .* run_dir={tiny_run}\\. "):
        merge._cli([f"run_dir={checkpoint}"])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "checkpoint-9").mkdir()  # a save cut short: no COMPLETE marker
    with pytest.raises(UserError, match="checkpoint-9 is a checkpoint cut short .* give a complete one"):
        parse_args([f"run_dir={tmp_path / 'checkpoint-9'}"], evaluate.DEFAULTS, "")


@pytest.mark.parametrize("module", [evaluate, chat, merge])
def test_help_prints_usage_and_defaults(module, capsys):
    with pytest.raises(SystemExit) as e:
        module._cli(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: {module.USAGE}\n\n{module.__doc__.splitlines()[0]}")
    assert "defaults: run_dir=, " in out


@pytest.mark.slow
def test_embedded_adapter_beats_base_and_merges(embedded_run):
    m = evaluate.evaluate(embedded_run, max_new_tokens=96, limit=8)
    assert m["fine_tuned"]["loss"] < m["base"]["loss"] - 0.2
    assert m["fine_tuned"]["rouge_l"] > m["base"]["rouge_l"]
    report = merge.merge(embedded_run, dtype="float32", limit=8)
    assert report["relative_difference"] < 0.01
    card = (embedded_run / "final_model" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "SmolLM2-135M-Instruct.Q4_1.gguf" in card


@pytest.mark.slow
def test_embedded_chat_answers_and_stops(embedded_run):
    r = subprocess.run([sys.executable, "-m", "sft_recipes.chat", f"run_dir={embedded_run}",
                        "prompt=What is the median?", "max_new_tokens=150"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    answer = r.stdout.strip().splitlines()[-1]
    assert "median" in answer.lower() and len(answer.split()) >= 5 and "<|im_end|>" not in answer


def test_a_repetition_penalty_reaches_every_answer(tiny_run, tmp_path):
    test = tmp_path / "penalty.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in json.loads(VAL.read_text())[:3]))
    answers, metrics = {}, {}
    for penalty in (1.0, 1e6):
        metrics[penalty] = evaluate.evaluate(tiny_run, max_new_tokens=12, data=str(test), repetition_penalty=penalty)
        answers[penalty] = [(p["base"], p["fine_tuned"]) for p in map(json.loads, (tiny_run / "eval_penalty" /
                                                                                     "predictions.jsonl").open())]
    assert metrics[1e6]["repetition_penalty"] == 1e6 and answers[1e6] != answers[1.0]
    # every token already in the conversation is all but ruled out, the end-of-turn token of the system and user turns
    # included: no answer of either model stops, and none repeats a word
    assert metrics[1e6]["base"]["stopped_at_end_of_turn"] == metrics[1e6]["fine_tuned"]["stopped_at_end_of_turn"] == 0
    assert all(len(set(a.split())) == len(a.split()) > 3 for pair in answers[1e6] for a in pair)
    assert "greedy answers of at most 12 tokens, repetition penalty 1000000.0." in (
        tiny_run / "eval_penalty" / "report.md").read_text()
    assert "greedy answers of at most 12 tokens, repetition penalty 1000000.0):" in (
        tiny_run / "final_model" / "README.md").read_text()  # the model card says so too


def test_a_reply_ends_at_the_templates_end_of_turn_token_where_that_is_not_eos(tiny_dir, embedded_dir, tmp_path):
    """A tokenizer whose eos_token is not the token that ends a reply in its chat template (a Qwen base model's
    <|endoftext|> beside ChatML's <|im_end|>; Gemma's <eos> beside <end_of_turn>): each reply trains through the
    template's token and no further, answers stop there (generate() given eos_token_id stops at those alone), the
    model card's code names it, and a merged model's generation_config holds it."""
    from transformers import AutoModelForCausalLM

    from sft_recipes import card, prepare, templates
    from sft_recipes.models import load_tokenizer

    tok = load_tokenizer(embedded_dir)
    tok.eos_token = "<|endoftext|>"
    assert prepare.turn_end(tok) == "<|im_end|>" and prepare.stop_ids(tok) == [2, 0]
    ds, _ = prepare.tokenize(data.load_records(TRAIN)[:3], tok, templates.get("chat"), 512)
    assert [tok.convert_ids_to_tokens(row["input_ids"][-1]) for row in ds] == ["<|im_end|>"] * 3  # (no newline)
    assert all(label != -100 for label in ds[0]["labels"][-3:])

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = tok.eos_token_id  # as a base model's: <|endoftext|> alone
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)  # it always says <|im_end|>
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[2] = 10.0
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    conversation = [{"role": "user", "content": "What is a p-value?"}]
    assert runs.generate(model, tok, [conversation], max_new_tokens=6) == [("", True)]
    assert chat.answer(model, tok, conversation, max_new_tokens=6) == "" and len(calls) == 2  # one step each

    tok.save_pretrained(tmp_path / "adapter")
    code = "\n".join(card.answer_lines(tmp_path / "adapter", merged=False))
    assert 'eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])' in code
    assert prepare.stop_ids(tok, model) == [2, 0]
