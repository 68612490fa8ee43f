"""Question/answer/source records -> validated -> chat-formatted, tokenized `datasets.Dataset`.

We tokenize ourselves (one batched call of the fast tokenizer) instead of letting TRL do it, so that the
length audit, truncation policy and the dry-run display see exactly the tokens that are trained, and so that
nothing is dropped without being counted. Each row is `input_ids` + `labels` (-100 on the prompt): the
loss falls on the answer and on the end-of-turn token that ends it. TRL uses such rows as they are.
"""
from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import UserError
from .templates import Template

REQUIRED = ("question", "answer")
OPTIONAL = ("source",)
MAX_LISTED = 20


@dataclass
class Record:
    question: str
    answer: str
    source: str = ""
    where: str = ""  # "file:record N" for messages

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "source": self.source}


def _parse(path: Path) -> Tuple[str, List[Tuple[int, object]]]:
    """("line" or "record", [(number, raw value)]): line numbers for JSONL, array positions for JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}).") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}).") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty; expected a JSON array or JSON lines of "
                        '{"question": ..., "answer": ..., "source": ...} records.')
    value = None
    if path.suffix != ".jsonl":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    if value is None:  # JSON lines: one record per line
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}).") from None
        return "line", rows
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a JSON array of records, found a {type(value).__name__}.")
    return "record", list(enumerate(value, 1))


def load_records(path: str) -> List[Record]:
    """Read and validate one JSON/JSONL file; every problem is listed (up to MAX_LISTED) in one error."""
    p = Path(path)
    unit, rows = _parse(p)
    if not rows:
        raise UserError(f"{p}: contains no records.")
    records, problems = [], []
    for n, raw in rows:
        where = f"{p}, {unit} {n}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected an object with 'question' and 'answer', found {type(raw).__name__}")
            continue
        bad = False
        for key in REQUIRED + OPTIONAL:
            value = raw.get(key)
            if value is None:
                if key in REQUIRED:
                    problems.append(f"{where}: field '{key}' is missing")
                    bad = True
            elif not isinstance(value, str):
                problems.append(f"{where}: field '{key}' must be a string, found {type(value).__name__}")
                bad = True
            elif key in REQUIRED and not value.strip():
                problems.append(f"{where}: field '{key}' is empty")
                bad = True
        if not bad:
            records.append(Record(raw["question"], raw["answer"], raw.get("source") or "", where))
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{len(problems)} invalid record(s) in {p}: {shown}{more}. "
                        "Each record needs non-empty string fields 'question' and 'answer' "
                        "('source' is an optional string).")
    return records


def split(records: List[Record], val_fraction: float, seed: int) -> Tuple[List[Record], List[Record]]:
    if val_fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * val_fraction))
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])


@dataclass
class Stats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    over_max_length: int = 0
    prompt_mismatch: int = 0
    lengths: List[int] = field(default_factory=list)  # tokens per record before truncation
    trained_tokens: int = 0

    def percentile(self, q: float) -> int:
        s = sorted(self.lengths)
        return s[min(len(s) - 1, int(q * len(s)))] if s else 0

    def summary(self) -> Dict[str, int]:
        return {"records": self.records, "kept": self.kept, "tokens_p50": self.percentile(0.5),
                "tokens_p90": self.percentile(0.9), "tokens_max": max(self.lengths, default=0),
                "over_max_length": self.over_max_length, "truncated": self.truncated, "dropped": self.dropped,
                "trained_tokens": self.trained_tokens}


def render(records: Sequence[Record], tokenizer, template: Template,
           system_prompt: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """(prompt text as at inference, full conversation text) per record, through the chat template."""
    prompts = [template.messages(r.as_dict(), system_prompt) for r in records]
    prompt_texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    full_texts = tokenizer.apply_chat_template(
        [p + [{"role": "assistant", "content": r.answer}] for p, r in zip(prompts, records)], tokenize=False)
    eos = tokenizer.eos_token
    out = []
    for r, prompt, full in zip(records, prompt_texts, full_texts):
        if not full.startswith(prompt):
            raise UserError(f"Template '{template.name}' renders the prompt of {r.where} differently alone than "
                            "inside the conversation, so training would not match inference; fix its chat_template.")
        # End the trained text at the end-of-turn token: what follows it (a newline) is never generated.
        stripped = full.rstrip()
        out.append(stripped if eos and stripped.endswith(eos) else full)
    return prompt_texts, out


def tokenize(records: Sequence[Record], tokenizer, template: Template, max_length: int,
             overlong: str = "truncate", system_prompt: Optional[str] = None):
    """Tokenize records into a Dataset of input_ids/labels, applying the overlong policy. Returns (dataset, stats)."""
    from datasets import Dataset

    prompt_texts, full_texts = render(records, tokenizer, template, system_prompt)
    enc = tokenizer(full_texts, add_special_tokens=False, return_offsets_mapping=True)
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    stats = Stats(records=len(records))
    rows: Dict[str, list] = {"input_ids": [], "labels": []}
    overlong_where = []
    for r, prompt, ids, offsets, p_ids in zip(records, prompt_texts, enc["input_ids"],
                                              enc["offset_mapping"], prompt_ids):
        n_prompt = bisect.bisect_left([start for start, _ in offsets], len(prompt))
        if ids[:n_prompt] != p_ids:
            stats.prompt_mismatch += 1
        stats.lengths.append(len(ids))
        if len(ids) > max_length:
            stats.over_max_length += 1
            overlong_where.append(r.where)
            if overlong == "drop" or n_prompt >= max_length - 1:
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids = ids[:max_length]
        labels = [-100] * n_prompt + ids[n_prompt:]
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        stats.trained_tokens += len(ids) - n_prompt
    if overlong == "error" and overlong_where:
        raise UserError(f"{len(overlong_where)} record(s) exceed data.max_length={max_length} tokens: "
                        f"{'; '.join(overlong_where[:MAX_LISTED])}. Raise data.max_length, or set "
                        "data.overlong=truncate (cut the answer) or data.overlong=drop.")
    stats.kept = len(rows["input_ids"])
    if not stats.kept:
        raise UserError(f"No record fits data.max_length={max_length}: every question alone is longer. "
                        "Raise data.max_length.")
    return Dataset.from_dict(rows), stats


def show_example(row: dict, tokenizer) -> str:
    """Decode one training row with the trained span (the tokens that carry loss) between >>> and <<<."""
    ids, labels = row["input_ids"], row["labels"]
    first = next(i for i, lab in enumerate(labels) if lab != -100)
    return tokenizer.decode(ids[:first]) + ">>>" + tokenizer.decode(ids[first:]) + "<<<"
