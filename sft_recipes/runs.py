"""A finished run dir, for evaluate, chat and merge: its config, tokenizer, base model and adapter.

Everything comes from the run itself: `.hydra/config.yaml` (model, quantization, template, data) and
`final_model/` (the adapter and the tokenizer with the chat template it was trained with), so inference
renders prompts exactly as training did. `run_dir=RUN/checkpoint-N` means that checkpoint's adapter instead
(evaluate and chat: how good was the run at step N, or is it so far).
"""
from __future__ import annotations

import difflib
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from .errors import UserError
from .resume import CHECKPOINT, COMPLETE, RUN_CONFIG, expand_home, last_checkpoint, map_paths


def parse_args(argv: Sequence[str], defaults: Dict[str, object], usage: str, doc: str = "") -> Dict[str, object]:
    """key=value arguments (as Hydra writes overrides), typed like their defaults; unknown keys are an error.
    `-h`/`--help` prints the usage, the module's `doc` and the defaults, and exits."""
    if "-h" in argv or "--help" in argv:
        shown = ", ".join(f"{k}={'' if v is None else v}" for k, v in defaults.items())
        print(f"usage: {usage}\n\n{doc.strip()}\n\ndefaults: {shown}" if doc else f"usage: {usage}\ndefaults: {shown}")
        raise SystemExit(0)
    out = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in defaults:
            meant = ["prompt"] if key == "question" and "prompt" in defaults else difflib.get_close_matches(
                key, defaults, 1)
            raise UserError(f"Unknown argument '{arg}'" + (f" (did you mean {meant[0]}?)" if sep and meant else "")
                            + f". Usage: {usage} (keys: {', '.join(defaults)}).")
        kind = type(defaults[key]) if defaults[key] is not None else str
        try:
            out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise UserError(f"{key}={value}: expected {kind.__name__}.") from None
        if kind is int and out[key] < (1 if defaults[key] > 0 else 0):  # counts: positive where the default is
            raise UserError(f"{key}={value} must be {'positive' if defaults[key] > 0 else '0 or positive'}.")
    if out.get("run_dir") in (None, ""):
        raise UserError(f"run_dir is required (run_dir=latest: the newest finished run under outputs/). Usage: {usage}")
    if out["run_dir"] == "latest":
        out["run_dir"] = str(latest())
        print(f"run_dir=latest: {out['run_dir']}", file=sys.stderr)
    run = Path(out["run_dir"])
    if run.name == "final_model" and (run.parent / ".hydra").is_dir():  # the adapter's folder: its run is meant
        out["run_dir"] = str(run.parent)
    elif is_checkpoint(run) and not (run / COMPLETE).exists():
        raise UserError(f"run_dir={run} is a checkpoint cut short (no {COMPLETE} marker); give a complete one, or the "
                        f"run, run_dir={run.parent}.")
    return out


def latest(root: str = "outputs") -> Path:
    """run_dir=latest: the run under root (relative to where the command runs) whose final_model/ was saved last."""
    finished = [p.parent.parent for p in Path(root).glob(f"*/final_model/{COMPLETE}")]
    if not finished:
        raise UserError(f"run_dir=latest: no finished run under {Path(root).resolve()} (a folder with final_model/); "
                        "give the run's folder, run_dir=RUN.")
    return max(finished, key=lambda p: (p / "final_model" / COMPLETE).stat().st_mtime)


def main_guard(fn, argv=None) -> int:
    """Run a small CLI: our errors become one paragraph and exit status 2; Ctrl-C (leaving a chat, say) one line
    and status 130."""
    from . import quiet_logs

    quiet_logs()
    try:
        fn(sys.argv[1:] if argv is None else argv)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nStopped by Ctrl-C.", file=sys.stderr)
        return 130


def is_checkpoint(path) -> bool:
    """Whether run_dir= names one of a run's checkpoint-N folders rather than the run (its final_model/)."""
    return CHECKPOINT.match(Path(path).name) is not None and (Path(path).parent / ".hydra").is_dir()


def run_of(path) -> Path:
    """The run dir of run_dir=PATH: PATH, or the run a checkpoint belongs to."""
    return Path(path).parent if is_checkpoint(path) else Path(path)


def adapter_dir(path) -> Path:
    """The adapter (and tokenizer) that run_dir=PATH means: RUN/final_model, or the checkpoint PATH itself."""
    return Path(path) if is_checkpoint(path) else Path(path) / "final_model"


def config(run_dir) -> object:
    """The run's config (for a checkpoint: the config it was trained with, kept in its run_config.yaml)."""
    run = run_of(run_dir)
    path = run / ".hydra" / "config.yaml"
    if not run.is_dir():
        raise UserError(f"run_dir={run_dir}: no such folder" + ("." if run.is_absolute() else f" (from {Path.cwd()})."))
    if not path.exists():
        held = sorted((p.stat().st_mtime, str(p.parent.parent)) for p in run.glob("*/.hydra/config.yaml"))  # outputs/
        raise UserError(f"{run_dir} is not a run dir: {path} is missing."
                        + (f" It holds {len(held)} run(s): give one, e.g. the newest: run_dir={held[-1][1]}"
                           + (" (or run_dir=latest: the newest finished run under outputs/)." if run.name == "outputs"
                              else ".") if held else ""))
    from .config import Config

    if is_checkpoint(run_dir) and (Path(run_dir) / RUN_CONFIG).exists():
        path = Path(run_dir) / RUN_CONFIG
    # onto the schema: typed, and keys added since the run was made get their defaults
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    expand_home(cfg)
    from_launch_dir(cfg, run)
    if not (adapter_dir(run_dir) / "adapter_config.json").exists():
        if cfg.dry_run:
            raise UserError(f"{run_dir} holds a dry run: it trained nothing.")
        newest = last_checkpoint(run)
        raise UserError(f"{run_dir} has no final_model/ adapter yet (is the run finished? continue it with python -m "
                        f"sft_recipes {shlex.quote(f'resume_from={run_dir}')}"
                        + (f", or give its newest checkpoint: run_dir={newest}" if newest else "") + ").")
    return cfg


def from_launch_dir(cfg, run: Path) -> None:
    """Relative paths in the run's config (data files, a model folder) meant the folder training ran in (Hydra keeps
    it in .hydra/hydra.yaml): from another folder, each that is not found here is taken from there."""
    import glob

    try:
        launched = Path(OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.cwd)
    except Exception:  # (no hydra.yaml: a config written by hand or by a test)
        return
    if launched == Path.cwd():
        return

    def moved(p):
        if p == "auto" or Path(p).is_absolute() or glob.glob(p):
            return p
        return str(launched / p) if glob.glob(str(launched / p)) else p

    map_paths(cfg, moved)


def tokenizer(run_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(adapter_dir(run_dir))


def base_model(cfg):
    """The base model as it was trained: quantized per the run's config."""
    from . import build, models

    attn = "sdpa" if cfg.model.attn_implementation == "flex_attention" else cfg.model.attn_implementation
    return models.load_model(models.resolve_config(cfg.model), cfg.model.dtype, build.bnb_config(cfg.quantization), attn,
                             cfg.model.trust_remote_code)


def adapter_model(cfg, run_dir, base=None):
    """The run's adapter (or the checkpoint's) on `base` (default: the base model as trained)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base if base is not None else base_model(cfg), adapter_dir(run_dir)).eval()


def messages(cfg, question: str, history: List[dict] = (), source: str = "",
             system: Optional[str] = None) -> List[dict]:
    """The prompt messages for a question (and its source, for templates that show it), with the run's template
    and system prompt (or `system`: a chat transcript's own) and chat history."""
    from .train import template_of

    system = system if system is not None else cfg.data.system_prompt
    return template_of(cfg).messages({"question": question, "source": source}, system, history)


def record_messages(cfg, r, source: str = "") -> List[dict]:
    """The prompt messages of a record (sft_recipes.data.Record) as it trained: after its earlier turns, with its own
    system message and source (else the run's system prompt and `source`)."""
    return messages(cfg, r.question, r.history_messages(), r.source or source, r.system)


def sampling_args(temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> dict:
    """generate's arguments: greedy at temperature 0, else sampled with temperature and top_p; a repetition penalty
    above 1 makes tokens already in the conversation less likely (a small model's greedy loops)."""
    args = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    return {**args, "repetition_penalty": repetition_penalty} if repetition_penalty != 1 else args


def generate(model, tok, conversations: List[List[dict]], max_new_tokens: int, batch_size: int = 8,
             sampling: Optional[dict] = None, use_cache: Optional[bool] = None, progress: str = "",
             chat_args: Optional[dict] = None):
    """Answers for prompt conversations (greedy, or `sampling`: sampling_args), batched with left padding (the
    tokenizer's own padding side is left as it was); stops at the end-of-turn token. 4-bit layers on the CPU use
    bitsandbytes' inference layout while it runs (models.repacked_for_inference). With `progress` (a label), answers
    done and the time left go to stderr when there is more than one batch. `chat_args` go to the chat template
    (prepare.thinking_off).
    Returns [(text, stopped at end-of-turn)]; the text leaves out a reasoning block (prepare.reasoning_end)."""
    from .models import repacked_for_inference

    with repacked_for_inference(model):
        return _generate(model, tok, conversations, max_new_tokens, batch_size, sampling, use_cache, progress,
                         chat_args or {})


class Progress:
    """`label: 16/200 answers, 4:10 left` on stderr: one line rewritten in a terminal, else a line per tenth."""

    def __init__(self, label: str, total: int):
        import time

        from . import terminal

        self.label, self.total, self.began, self.tty, self.shown = label, total, time.perf_counter(), terminal(), -1

    def update(self, done: int) -> None:
        import time

        from .report import duration

        tenth = 10 * done // self.total
        if not self.tty and tenth == self.shown:
            return
        self.shown = tenth
        left = (time.perf_counter() - self.began) / done * (self.total - done)
        line = f"{self.label}: {done}/{self.total} answers" + (f", {duration(left)} left" if done < self.total else "")
        print(f"\r{line}\033[K" if self.tty else line, end="\n" if not self.tty or done == self.total else "",
              file=sys.stderr, flush=True)


def _generate(model, tok, conversations, max_new_tokens, batch_size, sampling, use_cache, progress, chat_args):
    import torch

    from .prepare import answer_of, reasoning_end, stop_ids

    shown = Progress(progress, len(conversations)) if progress and len(conversations) > batch_size else None
    out, stops, reasoned = [], stop_ids(tok, model), reasoning_end(tok)
    device = next(model.parameters()).device
    for i in range(0, len(conversations), batch_size):
        side, tok.padding_side = tok.padding_side, "left"
        try:
            batch = tok.apply_chat_template(conversations[i:i + batch_size], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True, padding=True,
                                            **chat_args).to(device)
        finally:
            tok.padding_side = side
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, **(sampling or {"do_sample": False}),
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id,
                                 **({} if use_cache is None else {"use_cache": use_cache}))
        for row in ids[:, batch["input_ids"].shape[1]:]:
            row = row.tolist()
            end = next((n for n, i in enumerate(row) if i in stops), None)
            text = tok.decode(row[:end], skip_special_tokens=True).strip()
            out.append((answer_of(text, reasoned), end is not None))
        if shown:
            shown.update(len(out))
    return out


def validation(cfg, tok, limit: int = 0, data=None):
    """(records, tokenized rows) of the run's validation split, or of the records in `data` (files as
    data.train_path takes them, read with the run's column names), rendered with the run's template."""
    from . import prepare
    from .train import data_options, data_paths, template_of

    if data:
        records = load_files(data, data_options(cfg).columns)
    else:
        _, records, _ = prepare.load_and_split(*data_paths(cfg), data_options(cfg))
    records = records[:limit] if limit else records
    if not records:
        return [], None
    rows, _ = prepare.tokenize(records, tok, template_of(cfg), cfg.data.max_length, "truncate", cfg.data.system_prompt,
                               cfg.data.train_replies)
    return records, rows


def load_files(spec, columns: dict, required: Sequence[str] = ("question", "answer")) -> list:
    """The records of files given to evaluate (data=) or chat (questions=), read as training read its files: with
    the run's column names (data.columns), or the plain ones where a file has none of those. Errors leave out the
    data.columns hint: these commands take no data.columns."""
    from .data import load_many, shown, without_hint

    try:
        return load_many(spec, columns, required=tuple(required))
    except UserError as e:
        error = str(e)
    fields = f"{' and '.join(required)} column{'s' if len(required) > 1 else ''}"
    plain = " and ".join(shown(k) for k in required)
    theirs = " and ".join(shown(columns[k]) for k in required)
    what = "questions" if list(required) == ["question"] else "records"
    also = "" if theirs == plain else f", or from {plain} in a file that has none of those"
    raise UserError(f"{without_hint(error).rstrip('.')}. (The {what} are read from the run's {fields}, {theirs}{also}.)")


def ancestors(cfg) -> list:
    """The configs of the runs whose adapter this run trained further (model.adapter: a run dir, its final_model or
    one of its checkpoints), nearest first; the chain ends at an adapter folder that is not part of a run."""
    found, adapter = [], cfg.model.adapter
    while adapter and len(found) < 100:
        path = Path(adapter)
        try:
            found.append(config(path.parent if path.name == "final_model" else path))
        except UserError:
            break
        adapter = found[-1].model.adapter
    return found


def training_records(cfg) -> list:
    """The records a run trained on (its training split), read again from its files; none when they are gone."""
    from . import prepare
    from .train import data_options, data_paths

    try:
        return prepare.load_and_split(data_paths(cfg)[0], None, data_options(cfg))[0]
    except UserError:
        return []


def mean_loss(model, rows) -> float:
    """Mean per-token loss over tokenized rows (input_ids + labels), one row at a time: no padding."""
    import torch

    device = next(model.parameters()).device
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([row["labels"]], device=device)
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
            count += n
    return total / max(count, 1)
