"""Question/answer/source records: read, validate, deduplicate and split. No tokenizer, no Hydra here.

Input: a JSON array, JSON lines, CSV (`,` or `;`), TSV or Parquet file (CSV and TSV cells are all text; a number
elsewhere is read as its text), a `datasets` save_to_disk folder, a folder or glob of such files, or a list of these.
A record is a question/answer object (data.columns names its fields, or lists fields to join) or a chat transcript
(OpenAI's messages, ShareGPT's conversations, TRL's conversational prompt and completion): its last exchange is the
question and answer, the earlier ones its history. Every invalid record is reported (up to MAX_LISTED, then a count)
with its file, record or line number and field, in one `UserError`; unknown extra fields are a warning.
`python -m sft_recipes.data validate PATH...` checks files without any model.
"""
from __future__ import annotations

import glob
import json
import numbers
import os
import random
import re
import shlex
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import UserError

FIELDS = ("question", "answer", "source")
REQUIRED = ("question", "answer")
MAX_LISTED = 20
SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")  # each also gzip-compressed: qa.jsonl.gz
SPREADSHEETS = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")  # named in their error: save them as CSV
DEFAULT_COLUMNS = {"question": "question", "answer": "answer", "source": "source"}
# How the data.columns hint at the end of an invalid-records message begins (without_hint cuts it there)
HINTS = ("map other column names", "the records have the field(s)")
# Other names for our fields in common data sets (Alpaca, prompt/response, ...): an error suggests the mapping
ALIASES = {"question": ("instruction", "prompt", "query", "input", "q"),
           "answer": ("output", "response", "completion", "target", "a")}
CONTEXT = ("input", "context")  # fields that hold part of the question beside an instruction (Alpaca's, Dolly's)


@dataclass
class Record:
    question: str
    answer: str
    source: str = ""
    where: str = ""  # "FILE, record N" (or line N) for messages
    system: Optional[str] = None  # a chat transcript's system message: this record's system prompt
    history: Tuple[Tuple[str, str], ...] = ()  # a chat transcript's earlier exchanges: (user turn, reply), in order
    untrained: Tuple[int, ...] = ()  # its replies (0: the first) marked "weight": 0, as OpenAI's format allows

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "source": self.source}

    def history_messages(self) -> List[dict]:
        return [{"role": role, "content": text} for pair in self.history
                for role, text in zip(("user", "assistant"), pair)]


@dataclass
class FileReport:
    path: str
    records: int = 0
    warnings: List[str] = field(default_factory=list)


def plain(path: Path) -> Path:
    """The name a data file has without its .gz: its suffix says the format (qa.jsonl.gz: JSON lines), its stem the
    name (qa)."""
    return path.with_suffix("") if path.suffix == ".gz" else path


def _parts(path: Path) -> Tuple[Path, str, str]:
    """(folder, name, suffixes): qa/train.jsonl.gz -> (qa, "train", ".jsonl.gz")."""
    stem = plain(path).stem
    return path.parent, stem, path.name[len(stem):]


def _read_text(path: Path) -> str:
    import gzip
    import zlib

    try:  # a byte-order mark, as Windows editors and PowerShell write it, says UTF-8 or UTF-16 and is not data
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw  # gzip's own mark, whatever the name
        return raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{path}: a gzip file that cannot be decompressed ({e or 'it ends too soon'}).") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        excel = " (Excel: Save As, CSV UTF-8)" if plain(path).suffix in (".csv", ".tsv") else ""
        raise UserError(f"{path}: not UTF-8 text (line {line}, byte {e.start}: {e.reason}); save the file as "
                        f"UTF-8{excel}.") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}).") from None


def saved_dataset(folder: Path) -> Optional[str]:
    """"dataset" for a folder that `datasets`' Dataset.save_to_disk wrote, "dict" for a DatasetDict's, else None."""
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "dataset"
    return "dict" if (folder / "dataset_dict.json").is_file() else None


def _json_problem(e: json.JSONDecodeError) -> Tuple[str, int, int]:
    """(what is wrong, line, column) of a JSON parse error, in plain words for the usual slips: a comma after the last
    item (or, in JSON lines, after a record) and Python's single quotes."""
    before, here, pos, said = e.doc[:e.pos].rstrip(), e.doc[e.pos:e.pos + 1], e.pos, e.msg[0].lower() + e.msg[1:]
    if e.msg.startswith("Illegal trailing comma") or before.endswith(",") and here and here in "]}":
        said, pos = "a comma after the last item, which JSON does not allow", pos if here == "," else len(before) - 1
    elif e.msg.startswith("Extra data") and here == ",":
        said = "a comma after the record; JSON lines have none between records"
    elif here == "'":
        said = "a single quote, where JSON takes double quotes (a Python dict's repr() is not JSON)"
    return said, e.doc.count("\n", 0, pos) + 1, pos - e.doc.rfind("\n", 0, pos)


def _parse(path: Path) -> Tuple[str, List[Tuple[int, object]]]:
    """(unit, [(number, raw value)]): line numbers for JSON lines, positions in a JSON array ("record"; or in the one
    list of an object, {"data": [...]}) or a table ("row", the header not counted; a save_to_disk folder's rows too)."""
    if path.is_dir() or plain(path).suffix in (".csv", ".tsv", ".parquet"):  # (a folder: only save_to_disk's)
        return "row", list(enumerate(_read_table(path), 1))
    if path.suffix.lower() in SPREADSHEETS:
        raise UserError(f"{path}: a spreadsheet's own format is not read here; save it as CSV (Excel: File > Save As > "
                        "CSV UTF-8; LibreOffice and Numbers: export as CSV) and train on the .csv file.")
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty; expected a JSON array or JSON lines of "
                        '{"question": ..., "answer": ..., "source": ...} records.')
    value = None
    if plain(path).suffix != ".jsonl":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                said, line, column = _json_problem(e)
                raise UserError(f"{path}: not valid JSON at line {line}, column {column}: {said}.") from None
    if value is None:  # JSON lines: one record per line
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    suffix = plain(path).suffix
                    kind = ("" if suffix in SUFFIXES else f" (a {suffix or 'suffix-less'} file is read as "
                            f"JSON; {', '.join(SUFFIXES)} name the formats read here)")
                    said, _, column = _json_problem(e)
                    raise UserError(f"{path}, line {n}: not valid JSON at column {column}: {said}{kind}.") from None
        return "line", rows
    lists = [k for k, v in value.items() if isinstance(v, list)] if isinstance(value, dict) else []
    if len(lists) == 1 and all(isinstance(r, dict) for r in value[lists[0]]):  # {"data": [records], "version": ...}
        value = value[lists[0]]
    if not isinstance(value, list):
        if lists:
            found = f"an object with the lists {', '.join(map(repr, lists))}: save the records to train on in a file " \
                    "of their own"
        elif isinstance(value, dict):
            found = f"an object with the key(s) {', '.join(map(repr, value))}"
        else:
            found = f"a {type(value).__name__}"
        raise UserError(f"{path}: expected a JSON array of records, found {found}.")
    return "record", list(enumerate(value, 1))


def _read_table(path: Path) -> List[dict]:
    """CSV and TSV rows as text (a cell of digits is text too), Parquet and save_to_disk rows as `datasets` types
    them."""
    if plain(path).suffix == ".parquet" or path.is_dir():
        import datasets

        saved = path.is_dir()
        try:
            table = (datasets.load_from_disk(str(path)) if saved else
                     datasets.load_dataset("parquet", data_files=str(path), split="train"))
            return table.to_list()
        except Exception as e:  # the loader raises many types; all mean "cannot read this file"
            what = "a datasets save_to_disk folder" if saved else "Parquet"
            raise UserError(f"{path}: cannot be read as {what} ({type(e).__name__}: {e}).") from None
    import csv
    import io

    text = _read_text(path)  # (a byte-order mark, UTF-16, or a message naming the line that is not UTF-8)
    header = next(iter(text.splitlines()), "")
    # ',' unless the header line has none: Excel writes ';' where the decimal mark is ','
    sep = "\t" if plain(path).suffix == ".tsv" else "," if "," in header else next(
        (s for s in (";", "\t", "|") if s in header), ",")
    extra = object()
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep, restkey=extra)
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{path}: cannot be read as {plain(path).suffix[1:].upper()} ({e}).") from None
    if long := [n for n, row in enumerate(rows, 1) if extra in row]:
        raise UserError(f"{path}: {len(long)} row(s) have more cells than the header's {len(reader.fieldnames)} "
                        f"columns ({', '.join(reader.fieldnames)}): row(s) {', '.join(map(str, long[:MAX_LISTED]))}. "
                        f"A field that holds a '{sep}' must be in double quotes.")
    return rows


def _column_hint(missing: set, extra: dict) -> str:
    """How to read records whose fields have other names: the mapping, guessed from the fields they have. Each
    way it can begin is in HINTS."""
    if not (missing and extra):
        return f"{HINTS[0]} with data.columns.question=NAME etc"
    def mapping(key: str) -> str:
        if key == "question" and "instruction" in extra and (context := [c for c in CONTEXT if c in extra]):
            return f"'data.columns.question=[instruction,{context[0]}]'"  # (the text the instruction is about)
        return f"data.columns.{key}=" + next((a for a in ALIASES[key] if a in extra), "NAME")

    guess = " ".join(mapping(k) for k in sorted(missing, key=FIELDS.index))
    return f"{HINTS[1]} {', '.join(map(repr, sorted(extra)))}: map them with {guess}"


def without_hint(message: str) -> str:
    """An invalid-records message without its data.columns hint (for readers that take no data.columns)."""
    return re.split("; (?:" + "|".join(map(re.escape, HINTS)) + ")", message)[0]


Columns = Dict[str, Union[str, List[str]]]  # our field -> the file's name for it, or the names joined into it


def listed(name: Union[str, Sequence[str]]) -> List[str]:
    """A data.columns value as a list of names: a name, or several whose texts are joined (Alpaca's instruction
    and input into the question)."""
    return [name] if isinstance(name, str) else list(name)


def shown(name: Union[str, Sequence[str]]) -> str:
    return " + ".join(f"'{n}'" for n in listed(name))


def _key(raw: dict, name: str) -> str:
    """The record's key for a field name: the name, or else the one key that differs from it only in case or
    surrounding spaces (a spreadsheet's "Question" column)."""
    alike = [k for k in raw if isinstance(k, str) and k.strip().casefold() == name.casefold()]
    return name if name in raw or len(alike) != 1 else alike[0]


CHATS = ("messages", "conversations")  # a chat transcript's field: OpenAI's {role, content}, ShareGPT's {from, value}
ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's role names


def exchange(turns, answered: bool = True):
    """A chat transcript (a system message, optional; then user turns and the assistant's replies in turn, ending with
    a reply, which `answered=False` lets go) as ((question, answer, system, history, untrained), "") where question
    and answer are its last exchange, history the earlier (user turn, reply) pairs and untrained the replies with
    OpenAI's "weight": 0; or (None, what is wrong with it)."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None, "must be a list of {role, content} objects"
    roles, texts, weights = [], [], []
    for n, turn in enumerate(turns, 1):
        role, text = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if not isinstance(text, str) or not isinstance(role, str):
            what, value = ("content", text) if not isinstance(text, str) else ("role", role)
            return None, f"turn {n}: its {what} must be a string, found {type(value).__name__}"
        if turn.get("weight", 1) not in (0, 1):
            return None, f"turn {n}: its weight must be 0 (not trained) or 1, found {turn['weight']!r}"
        roles.append(ROLES.get(role, role))
        texts.append(text)
        weights.append(turn.get("weight", 1))
    first = 1 if roles[:1] == ["system"] else 0
    system, rest = (texts[0] if first else None), roles[first:]
    expected = ["user", "assistant"] * ((len(rest) + 1) // 2)
    if not rest or rest != expected[:len(rest)] or answered and len(rest) % 2:
        return None, (f"holds the turns {', '.join(map(str, roles)) or '(none)'}: a conversation is a system message "
                      "(optional), then user turns and the assistant's replies in turn, ending with a reply")
    if empty := next((n for n, t in enumerate(texts[first:], first + 1) if not t.strip()), None):
        return None, f"turn {empty} ({roles[empty - 1]}) is empty"
    untrained = tuple(n for n, w in enumerate(weights[first + 1::2]) if w == 0)
    if answered and len(untrained) == len(rest) // 2:
        return None, "has no reply to train: every one has the weight 0"
    if len(rest) % 2:  # a question without its answer (answered=False)
        texts.append("")
    pairs = list(zip(texts[first::2], texts[first + 1::2]))
    return (*pairs[-1], system, tuple(pairs[:-1]), untrained), ""


def as_texts(names: Sequence[str], values: list, numeric: Dict[str, int]) -> list:
    """The fields' values with each number as the text it was written as (42 -> "42", 0.5 -> "0.5"), as a CSV cell is
    read, counted in `numeric` by field name; NaN (a table's empty cell) as missing; anything else as it is."""
    out = []
    for name, v in zip(names, values):
        if isinstance(v, numbers.Number) and not isinstance(v, bool):
            if v == v:
                numeric[name] = numeric.get(name, 0) + 1
            v = None if v != v else str(v) if isinstance(v, numbers.Integral) else repr(float(v))
        out.append(v)
    return out


def not_strings(at: str, names: Sequence[str], values: list) -> List[str]:
    """What is wrong with the fields that hold a value other than text."""
    return [f"{at}: field '{name}' must be a string, found {type(v).__name__}"
            for name, v in zip(names, values) if v is not None and not isinstance(v, str)]


def joined(values: list) -> str:
    """The non-empty texts of the fields that data.columns lists, one per line."""
    return "\n".join(v for v in values if v and v.strip())


def prompt_completion(raw: dict) -> list:
    """The turns of TRL's conversational prompt-completion record; the replies in its prompt are context (weight 0),
    as TRL trains only on the completion."""
    context = [{**t, "weight": 0} if isinstance(t, dict) and t.get("role") == "assistant" else t for t in raw["prompt"]]
    return context + raw.get("completion", [])


def load_records(path: Union[str, Path], columns: Optional[Columns] = None,
                 report: Optional[FileReport] = None, required: Sequence[str] = REQUIRED) -> List[Record]:
    """Read and validate one file. `columns` maps our fields to the file's names (e.g. question -> prompt), or to
    a list of names whose non-empty texts are joined, one per line (question -> [instruction, input]);
    `required` (question and answer) must be non-empty strings, the other fields strings if present.
    A file that those names do not fit but the plain ones do is read with the plain ones, and the report says so:
    files of two shapes train together (your question/answer file beside Alpaca's instruction/output records), and
    a test set keeps the plain names. The error raised is the one with `columns`."""
    report = report if report is not None else FileReport(str(path))
    p = Path(path)
    unit, rows = _parse(p)  # (once: the plain names read the same rows)
    try:
        return _load_records(p, unit, rows, columns, report, required)
    except UserError as e:
        mapped = {k: v for k, v in (columns or {}).items() if listed(v) != [k]}
        names = {n for v in mapped.values() for n in listed(v)}
        if not mapped or any(isinstance(r, dict) and any(_key(r, n) in r for n in names) for _, r in rows):
            raise
        report.records, report.warnings = 0, []
        try:
            records = _load_records(p, unit, rows, None, report, required)
        except UserError:
            raise e from None
        report.warnings.insert(0, f"{path}: read with the plain field names, as it has none of the mapped ones ("
                               + ", ".join(f"{k}={shown(v)}" for k, v in mapped.items()) + ")")
        return records


def _load_records(p: Path, unit: str, rows: List[Tuple[int, object]], columns: Optional[Columns], report: FileReport,
                  required: Sequence[str]) -> List[Record]:
    """load_records' reading of the rows _parse found in `p`, with one set of column names."""
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    if not rows:
        raise UserError(f"{p}: contains no records.")
    records, problems, extra, missing = [], [], {}, set()  # extra: unknown field -> records where it holds a value
    absent: Dict[str, List[str]] = {}  # field -> its problems "field 'x' is missing", one per record
    numeric: Dict[str, int] = {}  # field -> records where it holds a number, read as text
    for n, raw in rows:
        where, at = f"{p}, {unit} {n}", f"{unit} {n}"
        if not isinstance(raw, dict):
            problems.append(f"{at}: expected an object with " + " and ".join(shown(cols[k]) for k in required)
                            + f", found {type(raw).__name__}")
            continue
        keys = {key: [_key(raw, name) for name in listed(cols[key])] for key in FIELDS}
        chat = next((k for k in CHATS if k in raw and not any(q in raw for q in keys["question"])), None)
        if not chat and isinstance(raw.get("prompt"), list) and isinstance(raw.get("completion", []), list):
            chat = "prompt' + 'completion"  # TRL's conversational prompt-completion: the prompt's replies are context
        if chat:  # a chat transcript
            parsed, problem = exchange(raw[chat] if chat in raw else prompt_completion(raw), "answer" in required)
            names = listed(cols["source"])
            sources = as_texts(names, [raw.get(k) for k in keys["source"]], numeric)
            if wrong := not_strings(at, names, sources):
                problems += wrong
            if problem:
                problems.append(f"{at}: field '{chat}' {problem}")
            elif not wrong:
                records.append(Record(*parsed[:2], joined(sources), where, *parsed[2:]))
            continue
        for k in raw.keys() - {k for names in keys.values() for k in names}:
            extra[k] = extra.get(k, 0) + (raw[k] not in (None, "", [], {}))
        text, bad = {}, False
        for key in FIELDS:
            names = listed(cols[key])
            values = as_texts(names, [raw.get(k) for k in keys[key]], numeric)
            if wrong := not_strings(at, names, values):
                problems += wrong
                bad = True
                continue
            text[key] = joined(values) if len(names) > 1 else values[0] or ""
            if key not in required or text[key].strip():
                continue
            bad = True
            if len(names) > 1:
                problems.append(f"{at}: fields {shown(names)} are all missing or empty")
                missing.add(key)
            elif values[0] is None:
                state = "missing" if keys[key][0] not in raw else "empty" if unit == "row" else "null"
                problems.append(f"{at}: field '{names[0]}' is {state}")
                if state == "missing":
                    absent.setdefault(names[0], []).append(problems[-1])
                missing.add(key)
            else:
                problems.append(f"{at}: field '{names[0]}' is {'empty' if not values[0] else 'only whitespace'}")
        if not bad:
            records.append(Record(text["question"], text["answer"], text["source"], where))
    if problems:
        nowhere = [name for name, theirs in absent.items() if len(theirs) == len(rows) > 1]
        if nowhere:  # a field that no record has: said once, not once per record
            said = {q for name in nowhere for q in absent[name]}
            problems = [f"no {unit} has the field '{name}'" for name in nowhere] + [q for q in problems if q not in said]
        listing = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        optional = " and ".join(shown(cols[k]) for k in FIELDS if k not in required)
        raise UserError(f"{len(rows) - len(records)} invalid record(s) in {p}: {listing}{more}. Each record needs "
                        "non-empty string fields " + " and ".join(shown(cols[k]) for k in required) + f" ({optional} "
                        f"{'is an optional string' if len(FIELDS) - len(required) == 1 else 'are optional strings'}"
                        f"); {_column_hint(missing, extra)}.")
    report.records = len(records)
    report.warnings += [f"{p}: field '{k}' held a number in {n} record(s), read as the text it was written as "
                        "(42 as \"42\"; a CSV cell is text too)" for k, n in numeric.items()]
    if extra:  # how much is left out: Alpaca's 'input', say, may hold part of the question
        report.warnings.append(f"{p}: unknown field(s) ignored: " + ", ".join(
            f"'{k}' (a value in {n} of {len(rows)} records)" for k, n in sorted(extra.items()))
            + _join_hint(cols["question"], [k for k, n in extra.items() if n and k in ALIASES["question"] + CONTEXT]))
    return records


def _join_hint(question, ignored: List[str]) -> str:
    """For an ignored field that often holds part of the question (Alpaca's 'input', Dolly's 'context'): the mapping
    that joins it."""
    if not ignored:
        return ""
    names = ",".join(listed(question) + ignored)
    return f"; 'data.columns.question=[{names}]' joins {shown(ignored)} to the question, one per line"


def expand(spec: Union[str, Sequence[str]]) -> List[Path]:
    """Files named by a path, folder (its *.json/*.jsonl/*.csv/*.tsv/*.parquet, and *.gz of them), glob, or a list of
    these. A folder that `datasets`' save_to_disk wrote is one entry, read as a whole; a DatasetDict's is refused,
    naming its splits."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: List[Path] = []
    for item in map(str, items):
        if any(c in item for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if plain(Path(f)).suffix in SUFFIXES)
            if not found:
                raise UserError(f"No data files match {item}.")
            files += found
        elif Path(item).is_dir() and (saved := saved_dataset(Path(item))):
            if saved == "dict":
                raise UserError(_dataset_dict_hint(Path(item)))
            files.append(Path(item))
        elif Path(item).is_dir():
            found = sorted(f for f in Path(item).iterdir() if plain(f).suffix in SUFFIXES)
            if not found:
                raise UserError(f"Folder {item} holds no {'/'.join(SUFFIXES)} files (nor .gz of them).")
            files += found
        elif Path(item).exists():
            files.append(Path(item))
        else:
            raise UserError(f"Data file {item} does not exist." + _hub_hint(item))
    return files


def _hub_hint(item: str) -> str:
    """For a missing path that reads as a Hub dataset id (owner/name, hf://datasets/owner/name): how to get it."""
    name = item.removeprefix("hf://datasets/")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or plain(Path(name)).suffix in SUFFIXES:
        return ""
    folder = name.split("/")[1]
    fetch = f"from datasets import load_dataset; load_dataset('{name}').save_to_disk('{folder}')"  # (no quotes in it)
    return (f" If it names a dataset on the Hugging Face Hub: runs read local files only (validated, and the same "
            f"again on resume), so save it to a folder once, python -c \"{fetch}\", then "
            f"data.train_path={folder}/train (data.columns maps fields named other than question and answer).")


def _dataset_dict_hint(folder: Path) -> str:
    """What to write for a DatasetDict folder: its splits are save_to_disk folders of their own."""
    splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits") or ["train"]
    train = "train" if "train" in splits else splits[0]
    held_out = [s for s in splits if s != train and HELD_OUT.search(s.lower())] or [s for s in splits if s != train]
    name = lambda split: shlex.quote(f"data.train_path={folder / split}")  # noqa: E731
    return (f"{folder} holds a DatasetDict (datasets' save_to_disk) with the split(s) {', '.join(splits)}: name a "
            f"split's folder, {name(train)}" + (f" {shlex.quote(f'data.val_path={folder / held_out[0]}')}"
                                                 if held_out else "") + ".")


def data_specs(train_spec, val_spec):
    """(training files, validation files) as the run reads them. With val_spec "auto": the file beside a single
    training file named <name>_val<suffix> (sft_sample.json -> sft_sample_val.json) validates, if there is one; in
    a folder, glob or list, every <name>_val<suffix> file beside a <name><suffix> of the same set moves from
    training to validation. Without such files: no validation files (then a share of the training data is
    split off, if any: data.val_fraction). Any other val_spec is taken as given."""
    if val_spec != "auto":
        return train_spec, val_spec
    if isinstance(train_spec, (str, Path)) and Path(train_spec).is_file():
        folder, name, suffixes = _parts(Path(train_spec))
        beside = folder / f"{name}_val{suffixes}"
        return train_spec, (str(beside) if beside.is_file() else None)
    try:
        files = expand(train_spec)
    except UserError:
        return train_spec, None  # (config.check names the missing files)
    names = set(map(_parts, files))
    val = [f for f in files if (p := _parts(f))[1].endswith("_val") and (p[0], p[1][:-4], p[2]) in names]
    if not val:
        return train_spec, None
    return [str(f) for f in files if f not in val], (str(val[0]) if len(val) == 1 else [str(f) for f in val])


HELD_OUT = re.compile(r"(^|[_.-])(val|valid|validation|dev|test|eval|heldout|held[_-]out)$")


def held_out_warning(path: Union[str, Path]) -> Optional[str]:
    """A training file whose name says it holds validation or test data (a test set trained on is no test)."""
    if HELD_OUT.search(plain(Path(path)).stem.lower()):
        return (f"{path}: trained on, though its name says held-out data (validation or test); if it is, leave it "
                "out of data.train_path (data.val_path=FILE validates on it)")
    return None


def load_many(spec, columns: Optional[Columns] = None,
              reports: Optional[List[FileReport]] = None, required: Sequence[str] = REQUIRED) -> List[Record]:
    """All records of all files in `spec`; every file is validated before the first error is raised."""
    records, errors = [], []
    for path in expand(spec):
        rep = FileReport(str(path))
        try:
            records += load_records(path, columns, rep, required)
        except UserError as e:
            errors.append(str(e))
        if reports is not None:
            reports.append(rep)
    if errors:
        raise UserError(" ".join(errors))
    return records


_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Case, whitespace and punctuation folded away: what makes two texts 'the same' for deduplication."""
    return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


@dataclass
class DedupReport:
    exact: int = 0  # identical question and answer
    normalized: int = 0  # identical after normalize()
    conflicting: int = 0  # same question, different answers (kept; reported)

    @property
    def dropped(self) -> int:
        return self.exact + self.normalized


def normalized_history(r: Record) -> Tuple[str, ...]:
    return tuple(normalize(text) for pair in r.history for text in pair)


def dedup(records: Sequence[Record]) -> Tuple[List[Record], DedupReport]:
    """Keep the first of each group of duplicate (question, answer) pairs (after the same earlier turns, in chats)."""
    rep = DedupReport()
    seen_exact, seen_norm, answers = set(), set(), {}
    kept = []
    for r in records:
        exact = (r.question, r.answer, r.history)
        norm = (normalize(r.question), normalize(r.answer), normalized_history(r))
        if exact in seen_exact:
            rep.exact += 1
            continue
        if norm in seen_norm:
            rep.normalized += 1
            continue
        seen_exact.add(exact)
        seen_norm.add(norm)
        if answers.setdefault((norm[0], norm[2]), norm[1]) != norm[1]:
            rep.conflicting += 1
        kept.append(r)
    return kept, rep


def split(records: List[Record], val_fraction: float, seed: int,
          by: str = "record") -> Tuple[List[Record], List[Record]]:
    """A seeded validation split. by="source" keeps every record of a source on the same side."""
    if val_fraction <= 0:
        return list(records), []
    if by == "source":
        groups: Dict[str, List[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(r.source or f"\0{i}", []).append(i)
        keys = sorted(groups)
        random.Random(seed).shuffle(keys)
        target, val_idx = val_fraction * len(records), set()
        for k in keys:
            if len(val_idx) >= target:
                break
            val_idx.update(groups[k])
        if len(val_idx) == len(records):
            raise UserError(f"data.split_by=source: only {len(groups)} source(s), so no split leaves training "
                            "data; lower data.val_fraction or use data.split_by=record.")
    else:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        val_idx = set(order[:max(1, round(len(records) * val_fraction))])
        if len(val_idx) == len(records):
            raise UserError(f"data.val_fraction={val_fraction} of {len(records)} training record(s) leaves none to "
                            "train on; add records, or validate on a file of its own (data.val_path=FILE), or "
                            "set data.val_fraction=0 (no validation).")
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])


def overlap(train: Iterable[Record], val: Iterable[Record]) -> List[Record]:
    """Validation records whose (normalized) question also appears in training (after the same earlier turns, in a
    conversation): a leak."""
    seen = {(normalize(r.question), normalized_history(r)) for r in train}
    return [r for r in val if (normalize(r.question), normalized_history(r)) in seen]


def validate_main(paths: List[str], columns: Optional[Columns] = None) -> int:
    """Check files and print a summary table; 0 if all are valid, 2 otherwise."""
    rows, status = [], 0
    for path in expand(paths) if paths else []:
        rep = FileReport(str(path))
        try:
            records = load_records(path, columns, rep)
            kept, d = dedup(records)
            chats = sum(1 for r in records if r.history)
            notes = [f"{chats} conversation(s) of several exchanges"] * bool(chats) + rep.warnings
            rows.append((str(path), "ok", len(records), d.dropped, d.conflicting,
                         sum(1 for r in records if r.source), as_flags("; ".join(notes))))
        except UserError as e:
            status = 2
            rows.append((str(path), "INVALID", 0, 0, 0, 0, as_flags(str(e))))
    head = ("file", "status", "records", "duplicates", "conflicting", "with source", "notes")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *[r[:6] + ("",) for r in rows])]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r[:6], widths)) + ("  " + r[6] if r[6] else ""))
    return status


def as_flags(message: str) -> str:
    """A message's data.columns mappings as this command's --column flags."""
    return re.sub(r"'?data\.columns\.(\w+)=\[?([\w,-]+)\]?'?", r"--column \1=\2", message)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sft_recipes.data",
                                     description="Check question/answer data files without loading a model.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate files, folders or globs and print a summary table")
    v.add_argument("paths", nargs="+")
    v.add_argument("--column", action="append", default=[], metavar="FIELD=NAME[,NAME]",
                   help="map a field to a column name, e.g. --column question=prompt; several names are joined, one "
                        "per line (--column question=instruction,input)")
    args = parser.parse_args(argv)
    # CSV and Parquet are read through datasets: no progress bars, and no import of it for JSON files
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        columns = {k: names.split(",") if "," in names else names
                   for k, names in (c.split("=", 1) for c in args.column)}
        return validate_main(args.paths, columns)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
