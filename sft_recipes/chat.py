"""`python -m sft_recipes.chat run_dir=RUN`: talk to the fine-tuned model.

Interactive: a prompt with history (and line editing in a terminal), tokens streamed as they are generated,
Ctrl-C to stop an answer, `/reset` to forget the history, `/save FILE` to add the conversation to a JSON lines file
as a chat transcript (fix its replies there, and train on it), `/exit` (or Ctrl-D) to leave. One-shot, for scripts:
`prompt="..."` prints the answer and exits. A file of questions: `questions=FILE` (JSON, JSONL, CSV, TSV or
Parquet; only the question field is needed; a chat transcript's last user turn is asked after its earlier turns)
writes `{question, answer, source, stopped_at_end_of_turn}` lines (and `history`, for those) to `out`
(RUN/answers_<file name>.jsonl). The run's chat template and system prompt are used, as in training.
Answers are greedy unless `temperature` > 0 (then sampled, with `top_p` and `seed`); `repetition_penalty=1.1`
discourages a small model's loops (more also rules out the words the answer needs again), and an answer that
repeats itself (three copies of one passage in a row) is stopped there and kept with one copy, with a note
(`stop_loops=false` lets it run on to `max_new_tokens`; files of questions are answered as generated);
`base=true` answers with the base model alone, for comparison (asked as evaluate asks it: a chat template that can
turn reasoning off, Qwen3's, with it off). With a template that names the source in the prompt
(`chat_with_source`), `source="..."` gives it; `system="..."` asks with another system prompt than the run's (a run
trained on chat transcripts with their own). `run_dir=RUN/checkpoint-N` talks to that checkpoint's adapter (its
answers file: answers_<file name>_checkpoint-N).
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import List, Optional, Sequence

from .runs import sampling_args

USAGE = ('python -m sft_recipes.chat run_dir=RUN[/checkpoint-N]|latest [prompt="..." | questions=FILE '
         '[out=FILE.jsonl]] [source="..."] [max_new_tokens=256] [temperature=0] [top_p=1] [seed=0] '
         '[repetition_penalty=1] [stop_loops=true] [base=false] [batch_size=8] [system="..."]')
DEFAULTS = {"run_dir": None, "prompt": "", "questions": "", "out": "", "max_new_tokens": 256, "temperature": 0.0,
            "top_p": 1.0, "seed": 0, "repetition_penalty": 1.0, "stop_loops": True, "base": False, "batch_size": 8,
            "source": "", "system": None}
LOOP_NOTE = "repeating itself: stopped; repetition_penalty=1.1 makes that rarer, stop_loops=false lets it run on"

# A greedy answer that has begun to repeat itself runs on to max_new_tokens (a small model's habit): LOOP_COPIES
# back-to-back copies of one block of up to LOOP_PERIOD tokens, and at least LOOP_SPAN tokens in all, end it.
LOOP_COPIES, LOOP_SPAN, LOOP_PERIOD = 3, 32, 64


def loop_start(ids: Sequence[int]) -> Optional[int]:
    """Where the repeats begin when `ids` end in a loop (the length of the tokens up to and with its first copy);
    None when they do not."""
    tail = list(ids[-LOOP_PERIOD * LOOP_COPIES:])
    for period in range(1, min(LOOP_PERIOD, len(tail) // LOOP_COPIES) + 1):
        span = period * max(LOOP_COPIES, -(-LOOP_SPAN // period))  # (copies of `period` tokens, LOOP_SPAN at least)
        if span <= len(tail) and tail[-span:] == tail[-period:] * (span // period):
            return len(ids) - span + period
    return None


class Shown:
    """Streams a reply from its first word, without the empty reasoning block it opens with where the chat template
    writes one (prepare.reasoning_end: "<think>\n\n</think>\n\n" before a Qwen3 model's answers). A block with
    reasoning in it streams as it comes; the text is held back only while it may still be the empty one."""

    def __init__(self, stream, end: Optional[str]):
        self.stream, self.end, self.held, self.started = stream, end, "" if end else None, False

    def __call__(self, piece: str) -> None:
        if self.held is None:
            return self._emit(piece)
        self.held += piece
        opening, text = "<" + self.end[2:], self.held.lstrip()  # ("<think>")
        if text.startswith(opening):
            text = text[len(opening):].lstrip()
        elif opening.startswith(text):
            return
        if text.startswith(self.end):  # the empty block: left out
            self.held = None
            return self._emit(text[len(self.end):])
        if not self.end.startswith(text):
            self.close()

    def close(self) -> None:
        """The end of the reply: text still held back is shown."""
        held, self.held = self.held, None
        if held:
            self._emit(held)

    def _emit(self, text: str) -> None:
        if not self.started:  # (a model that opens with a newline: the answer starts at its first word)
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.stream(text)


def answer(model, tok, conversation, max_new_tokens: int, stream=None, sampling: Optional[dict] = None,
           stop_loops: bool = True, chat_args: Optional[dict] = None) -> str:
    """The answer to a conversation: greedy, or per `sampling` (sampling_args); with `stream`, each piece of text is
    passed to it as it comes, and Ctrl-C stops the answer there (the chat goes on). With `stop_loops`, an answer
    that repeats itself stops there, and the answer returned keeps one copy of the repeated passage (LOOP_NOTE is
    streamed, or printed to stderr). The answer returned leaves out a reasoning block (prepare.reasoning_end); the
    stream, an empty one (Shown). `chat_args` go to the chat template (prepare.thinking_off)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from .prepare import answer_of, reasoning_end, stop_ids

    inputs = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                     **(chat_args or {})).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    stop, prompt_length, kept = threading.Event(), inputs["input_ids"].shape[1], []

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if stop_loops and not kept:
                generated = input_ids[0, prompt_length:].tolist()
                if (end := loop_start(generated)) is not None:
                    kept.append(generated[:end])
            return torch.full((input_ids.shape[0],), stop.is_set() or bool(kept), dtype=torch.bool,
                              device=input_ids.device)

    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, **(sampling or sampling_args()),
                  eos_token_id=stop_ids(tok, model), pad_token_id=tok.pad_token_id, streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([Stop()]))
    worker = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs))
    pieces, reasoned = [], reasoning_end(tok)
    shown = Shown(stream, reasoned) if stream else None
    try:
        worker.start()
        for piece in streamer:
            pieces.append(piece)
            if shown:
                shown(piece)
        worker.join()
    except KeyboardInterrupt:
        stop.set()
        if worker.is_alive():  # (not when Ctrl-C came before it started)
            worker.join()
        if not stream:
            raise
        shown.close()
        stream(" [stopped]")
        return answer_of("".join(pieces).strip(), reasoned)
    if shown:
        shown.close()
    if kept:  # a loop: the answer keeps its first copy
        if stream:
            stream(f" [{LOOP_NOTE}]")
        else:
            print(f"note: the answer was {LOOP_NOTE}.", file=sys.stderr)
        return answer_of(tok.decode(kept[0], skip_special_tokens=True).strip(), reasoned)
    return answer_of("".join(pieces).strip(), reasoned)


def save(history: List[dict], path: str, system: Optional[str], source: str) -> str:
    """/save FILE: the conversation as one OpenAI-style chat transcript, added to the JSON lines file (the system
    prompt chat was given instead of the run's, and the source, beside it): what sft_recipes trains on."""
    if not history:
        return "(nothing to save yet)"
    record = {"messages": ([{"role": "system", "content": system}] if system is not None else []) + history}
    try:
        with open(Path(path).expanduser(), "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, **({"source": source} if source else {})}, ensure_ascii=False) + "\n")
    except OSError as e:
        return f"(not saved: {e.strerror or e}: {path})"
    empty = sum(not m["content"].strip() for m in history)  # (an answer stopped before its first word)
    return (f"(saved {len(history) // 2} exchange{'s' * (len(history) > 2)} to {path}"
            + (f"; {empty} empty repl{'ies' if empty > 1 else 'y'} to write before training on it" if empty else "")
            + ")")


def converse(cfg, ask, prompt: str, who: str, source: str = "", system: Optional[str] = None) -> None:
    """One answer to `prompt`, or the interactive loop: history, /reset, /save FILE, /exit."""
    from . import runs

    if prompt:
        print(ask(runs.messages(cfg, prompt, source=source)))
        return
    if sys.stdin.isatty():
        try:  # line editing, and the up arrow for earlier questions, in input()
            import readline  # noqa: F401
        except ImportError:  # (Windows)
            pass
    history = []
    print(f"Chat with the {who} model. /reset forgets the conversation, /save FILE adds it to a JSON lines file, "
          "/exit leaves, Ctrl-C stops an answer.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if line == "/save" or line.startswith("/save "):
            print(save(history, line[5:].strip(), system, source) if line[5:].strip() else "(usage: /save FILE)")
            continue
        if not line:
            continue
        try:  # a Ctrl-C from "model> " to the end of the line stops this answer, never the chat
            print("model> ", end="", flush=True)
            reply = ask(runs.messages(cfg, line, history, source),
                        stream=lambda piece: print(piece, end="", flush=True))
            print()
        except KeyboardInterrupt:  # (before the answer began, or as it ended)
            print(" [stopped]")
            continue
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


def answer_file(cfg, model, tok, records, out: Path, max_new_tokens: int, batch_size: int,
                sampling: dict, source: str = "", chat_args: Optional[dict] = None) -> None:
    """Answer every record's question (with its source, else `source`); JSON lines into `out`, written whole at the
    end (a file that is there already is replaced only then)."""
    import os

    from . import runs

    answers = runs.generate(model, tok, [runs.record_messages(cfg, r, source) for r in records], max_new_tokens,
                            batch_size, sampling, progress="questions", chat_args=chat_args)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:
        for r, (text, stopped) in zip(records, answers):
            f.write(json.dumps({**({"history": r.history_messages()} if r.history else {}),
                                "question": r.question, "answer": text, "source": r.source or source,
                                "stopped_at_end_of_turn": stopped}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def _cli(argv):
    import contextlib

    from transformers import set_seed

    from . import models, runs
    from .errors import UserError
    from .prepare import thinking_off
    from .templates import refusals
    from .train import template_of

    args = runs.parse_args(argv, DEFAULTS, USAGE, __doc__)
    if args["temperature"] < 0 or not 0 < args["top_p"] <= 1 or args["repetition_penalty"] <= 0:
        raise UserError(f"temperature={args['temperature']}, top_p={args['top_p']}, repetition_penalty="
                        f"{args['repetition_penalty']}: temperature must be >= 0 (0 is greedy), top_p in (0, 1] and "
                        "repetition_penalty positive (1: none).")
    cfg = runs.config(args["run_dir"])
    if args["system"] is not None:  # instead of the run's system prompt (a chat transcript's own still applies to it)
        cfg.data.system_prompt = args["system"]
    checkpoint = Path(args["run_dir"]).name if runs.is_checkpoint(args["run_dir"]) else ""  # run_dir=RUN/checkpoint-N
    records = []
    if args["questions"]:  # read and check them before any model loads
        from .data import expand, plain
        from .train import data_options

        records = runs.load_files(args["questions"], data_options(cfg).columns, required=("question",))
        files = expand(args["questions"])
        name = f"answers_{plain(files[0]).stem}" + (f"_{checkpoint}" if checkpoint else "")
        out = Path(args["out"] or runs.run_of(args["run_dir"]) / f"{name}.jsonl")
        if out.resolve() in {f.resolve() for f in files}:
            raise UserError(f"out={out} is one of the question files; the answers go to another file.")
        if not out.parent.is_dir():
            raise UserError(f"out={out}: the folder {out.parent} does not exist.")
    user = template_of(cfg).user
    if "{source}" in user and not args["source"] and not (records and all(r.source for r in records)):
        print(f"note: this run's prompts name a source (data.template={cfg.data.template}: {user!r}); "
              f"source=\"...\" gives one{' to questions without their own' if records else ''}.", file=sys.stderr)
    tok = runs.tokenizer(args["run_dir"])
    if args["system"]:  # (before the model loads)
        asked = [{"role": "system", "content": args["system"]}, {"role": "user", "content": "?"}]
        with refusals(f"system={args['system']!r}", asked, "This model's chat template takes no system message: "
                      "ask without system=."):
            tok.apply_chat_template(asked, add_generation_prompt=True, tokenize=False)
    model = runs.adapter_model(cfg, args["run_dir"])
    set_seed(args["seed"])
    sampling = sampling_args(args["temperature"], args["top_p"], args["repetition_penalty"])
    direct = thinking_off(tok) if args["base"] else {}  # (as evaluate asks the base model)
    if direct:
        print("note: the base model is asked with its chat template's "
              + ", ".join(f"{k}={v}" for k, v in direct.items()) + ", as evaluate asks it: it answers without "
              "reasoning first.", file=sys.stderr)
    ask = lambda conversation, stream=None: answer(  # noqa: E731
        model, tok, conversation, args["max_new_tokens"], stream, sampling, args["stop_loops"], direct)
    with model.disable_adapter() if args["base"] else contextlib.nullcontext():
        if args["questions"]:  # (runs.generate repacks the 4-bit layers for inference itself)
            answer_file(cfg, model, tok, records, out, args["max_new_tokens"], args["batch_size"],
                        sampling, args["source"], direct)
            print(f"{len(records)} answers ({'base' if args['base'] else 'fine-tuned'} model): {out}")
        else:
            who = "base" if args["base"] else "fine-tuned" + (f" ({checkpoint})" if checkpoint else "")
            with models.repacked_for_inference(model):  # generation only: the faster 4-bit layout for the session
                converse(cfg, ask, args["prompt"], who, args["source"], args["system"])


if __name__ == "__main__":
    from .runs import main_guard

    sys.exit(main_guard(_cli))
