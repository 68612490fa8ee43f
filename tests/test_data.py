import dataclasses
import json
from pathlib import Path

import pytest

from conftest import TRAIN, VAL
from sft_recipes import data, prepare, templates
from sft_recipes.errors import UserError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_sample_data_is_valid_and_large_enough():
    train, val = data.load_records(str(TRAIN)), data.load_records(str(VAL))
    assert len(train) >= 100 and len(val) >= 10
    assert all(r.source.startswith("OpenIntro Statistics") and "§" in r.source for r in train + val)
    assert not {r.question for r in train} & {r.question for r in val}  # held out for real


def test_jsonl_and_json_give_the_same_records(tmp_path):
    rows = [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": "A2.", "source": "S"}]
    a = data.load_records(write(tmp_path, "a.json", json.dumps(rows)))
    b = data.load_records(write(tmp_path, "b.jsonl", "\n".join(map(json.dumps, rows)) + "\n"))
    assert [r.as_dict() for r in a] == [r.as_dict() for r in b]
    assert b[1].where.endswith("b.jsonl, line 2")
    # as Windows tools write them: a UTF-8 byte-order mark first, CRLF line ends
    bom = b"\xef\xbb\xbf"
    (tmp_path / "c.json").write_bytes(bom + json.dumps(rows, indent=1).replace("\n", "\r\n").encode())
    (tmp_path / "d.jsonl").write_bytes(bom + "\r\n".join(map(json.dumps, rows)).encode() + b"\r\n")
    (tmp_path / "e.jsonl").write_bytes("\r\n".join(map(json.dumps, rows)).encode("utf-16"))  # PowerShell 5's `>`
    # CSV with ',' or, as Excel writes it where the decimal mark is ',', with ';' (a ',' inside a field stays text)
    table = [{"question": "Q1?", "answer": "A1.", "source": ""}, {"question": "Q2?", "answer": "A2, with a comma.",
                                                                   "source": "S"}]
    (tmp_path / "f.csv").write_bytes(bom + b'question,answer,source\r\nQ1?,A1.,\r\nQ2?,"A2, with a comma.",S\r\n')
    (tmp_path / "g.csv").write_text('question;answer;source\nQ1?;A1.;\nQ2?;A2, with a comma.;S\n')
    for name in ("c.json", "d.jsonl", "e.jsonl", "f.csv", "g.csv"):
        want = table if name.endswith(".csv") else [r.as_dict() for r in a]
        assert [r.as_dict() for r in data.load_records(tmp_path / name)] == want, name
    # a cell is text, digits too (pandas would type a column of numbers and refuse it as "not a string")
    (tmp_path / "h.csv").write_text("question,answer\nWhat is 6 x 7?,42\nWhat is pi to two places?,3.14\n")
    assert [r.answer for r in data.load_records(tmp_path / "h.csv")] == ["42", "3.14"]


def test_gzip_compressed_files_read_as_their_format(tmp_path):
    """qa.jsonl.gz, qa.json.gz, qa.csv.gz: read as the format before .gz (folders and globs find them); the
    validation file beside one is <name>_val with the same suffixes; a held-out name is still seen through .gz."""
    import gzip

    records = json.loads(TRAIN.read_text())[:3]
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    (folder / "a_val.jsonl.gz").write_bytes(gzip.compress((json.dumps(records[0]) + "\n").encode()))
    (folder / "b.json.gz").write_bytes(gzip.compress(json.dumps(records).encode()))
    (folder / "c.csv.gz").write_bytes(gzip.compress(b"Question,Answer\nWhat is 6 x 7?,42\n"))
    assert [r.answer for r in data.load_records(folder / "a.jsonl.gz")] == [r["answer"] for r in records]
    assert data.load_records(folder / "b.json.gz")[2].question == records[2]["question"]
    assert data.load_records(folder / "c.csv.gz")[0].answer == "42"
    assert [f.name for f in data.expand(str(folder))] == ["a.jsonl.gz", "a_val.jsonl.gz", "b.json.gz", "c.csv.gz"]
    assert data.expand(str(folder / "*.gz")) == data.expand(str(folder))
    assert data.data_specs(str(folder / "a.jsonl.gz"), "auto") == (str(folder / "a.jsonl.gz"),
                                                                      str(folder / "a_val.jsonl.gz"))
    assert data.data_specs(str(folder), "auto")[1] == str(folder / "a_val.jsonl.gz")
    assert data.held_out_warning(folder / "a_val.jsonl.gz") and not data.held_out_warning(folder / "a.jsonl.gz")


BROKEN = Path(__file__).parent / "broken"
EXPECTED = json.loads((BROKEN / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_corpus_gives_the_exact_message(name):
    """One file per problem; each must produce exactly its message, naming file, record/line and field."""
    path = BROKEN / name
    columns = {"question": "prompt", "answer": "response"} if path.suffix == ".csv" else None
    with pytest.raises(UserError) as e:
        data.load_records(path, columns)
    assert str(e.value) == EXPECTED[name].replace("{path}", str(path))


def test_every_broken_file_is_in_the_corpus():
    assert sorted(EXPECTED) == sorted(p.name for p in BROKEN.iterdir() if p.name != "expected.json")


def test_every_problem_is_listed_up_to_a_limit(tmp_path):
    rows = [{"question": "Q?"}, {"answer": "A"}, {"question": "Q?", "answer": "A"}, {"question": "Q?", "answer": None}]
    with pytest.raises(UserError) as e:
        data.load_records(write(tmp_path, "bad.json", json.dumps(rows)))
    msg = str(e.value)
    assert msg.startswith("3 invalid record(s)") and "record 1: field 'answer' is missing" in msg
    assert "record 2: field 'question' is missing" in msg and "record 4: field 'answer' is null" in msg
    with pytest.raises(UserError, match=r"^30 invalid record\(s\).*record 20: field 'answer' is empty; and 10 more\."):
        data.load_records(write(tmp_path, "many.json", json.dumps([{"question": "Q", "answer": ""}] * 30)))


def test_a_field_that_no_record_has_is_named_once(tmp_path):
    """Records with other field names (a dataset saved from the Hub, say) get one line per missing field, not one per
    record, then the fields they do have and the mapping that reads them."""
    rows = [{"instruction": f"Q{i}?", "output": "A"} for i in range(30)] + [{"instruction": "Q?", "answer": "A"}]
    with pytest.raises(UserError) as e:
        data.load_records(write(tmp_path, "other.json", json.dumps(rows)))
    msg = str(e.value)
    assert msg.startswith("31 invalid record(s) in ") and ": no record has the field 'question'; record 1: field " \
        "'answer' is missing; " in msg and msg.count("'answer' is missing") == 19 and "; and 11 more." in msg
    assert msg.count("'question' is missing") == 0 and "data.columns.question=instruction" in msg


def test_unknown_fields_are_a_warning_not_an_error(tmp_path):
    rep = data.FileReport("x")
    rows = [{"question": "Q", "answer": "A", "id": 3, "input": "context"}, {"question": "Q2", "answer": "A", "input": ""}]
    records = data.load_records(write(tmp_path, "x.json", json.dumps(rows)), report=rep)
    assert len(records) == 2 and rep.warnings == [f"{tmp_path / 'x.json'}: unknown field(s) ignored: 'id' (a value in "
                                                  "1 of 2 records), 'input' (a value in 1 of 2 records); 'data.columns."
                                                  "question=[question,input]' joins 'input' to the question, one per line"]


def test_records_in_the_one_list_of_an_object_are_read(tmp_path):
    """{"version": ..., "data": [records]}, as many exports write it: the one list is the records."""
    path = write(tmp_path, "wrapped.json", json.dumps({"version": "1.0", "data": [{"question": "Q?", "answer": "A."},
                                                                                  {"question": "Q2?"}]}))
    with pytest.raises(UserError, match=r"wrapped.json: record 2: field 'answer' is missing"):
        data.load_records(path)
    path = write(tmp_path, "wrapped.json", json.dumps({"version": "1.0", "data": [{"question": "Q?", "answer": "A."}]}))
    assert [r.question for r in data.load_records(path)] == ["Q?"]


def test_numbers_are_read_as_the_text_they_were_written_as(tmp_path):
    """A JSON or Parquet field that holds a number (a sum's answer, a page as the source) is read as a CSV cell is,
    as its text, and the file's report says how often; a bool, a list or an object stays an error, NaN is missing."""
    import pandas as pd

    rows = [{"question": "What is 21 + 21?", "answer": 42, "source": 7}, {"question": "Half of 1?", "answer": 0.5},
            {"question": "A third?", "answer": 1e-05}, {"messages": [{"role": "user", "content": "Hi?"},
                                                             {"role": "assistant", "content": "Hello."}], "source": 3}]
    report = data.FileReport("numbers.json")
    records = data.load_records(write(tmp_path, "numbers.json", json.dumps(rows)), report=report)
    assert [(r.answer, r.source) for r in records] == [("42", "7"), ("0.5", ""), ("1e-05", ""), ("Hello.", "3")]
    assert report.warnings == [
        f"{tmp_path / 'numbers.json'}: field 'answer' held a number in 3 record(s), read as the text it was written as "
        '(42 as "42"; a CSV cell is text too)',
        f"{tmp_path / 'numbers.json'}: field 'source' held a number in 2 record(s), read as the text it was written as "
        '(42 as "42"; a CSV cell is text too)']
    pd.DataFrame({"question": ["Q1?", "Q2?"], "answer": [3.0, float("nan")]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"^1 invalid record\(s\) in .*n.parquet: row 2: field 'answer' is empty\."):
        data.load_records(tmp_path / "n.parquet")
    pd.DataFrame({"question": ["Q1?"], "answer": [3]}).to_parquet(tmp_path / "n.parquet")  # numpy's int64
    assert [r.answer for r in data.load_records(tmp_path / "n.parquet")] == ["3"]


def test_several_columns_join_into_one_field(tmp_path):
    """Alpaca's instruction and input make the question: the non-empty texts, one per line."""
    rows = [{"instruction": "Summarize.", "input": "The mean is the sum over the count.", "output": "sum / n"},
            {"instruction": "What is a median?", "input": "", "output": "The middle value."},
            {"instruction": "  ", "input": None, "output": "A."}, {"instruction": "Q", "input": [3], "output": "A."}]
    path = write(tmp_path, "alpaca.json", json.dumps(rows))
    columns = {"question": ["instruction", "input"], "answer": "output"}
    with pytest.raises(UserError) as e:
        data.load_records(path, columns)
    assert (f"2 invalid record(s) in {path}: record 3: fields 'instruction' + 'input' are all missing or empty; record "
            "4: field 'input' must be a string, found list. Each record needs non-empty string fields 'instruction' + "
            "'input' and 'output' ('source' is an optional string)") in str(e.value)
    records = data.load_records(write(tmp_path, "ok.json", json.dumps(rows[:2])), columns)
    assert [(r.question, r.answer) for r in records] == [("Summarize.\nThe mean is the sum over the count.", "sum / n"),
                                                         ("What is a median?", "The middle value.")]


def test_records_under_other_names_get_the_mapping_that_reads_them(tmp_path):
    alpaca = write(tmp_path, "alpaca.json", json.dumps([{"instruction": "Q?", "input": "", "output": "A."}]))
    with pytest.raises(UserError) as e:
        data.load_records(alpaca)
    assert str(e.value).endswith("the records have the field(s) 'input', 'instruction', 'output': map them with "
                                 "'data.columns.question=[instruction,input]' data.columns.answer=output.")
    (r,) = data.load_records(alpaca, {"question": ["instruction", "input"], "answer": "output"})  # the hint, followed
    assert (r.question, r.answer) == ("Q?", "A.")
    dolly = write(tmp_path, "dolly.jsonl", json.dumps({"instruction": "Sum up.", "context": "A text.", "response": "A.",
                                                      "category": "summarization"}))
    with pytest.raises(UserError, match=r"map them with 'data.columns.question=\[instruction,context\]' "
                                        r"data.columns.answer=response\.$"):
        data.load_records(dolly)
    rep = data.FileReport("x")
    data.load_records(dolly, {"question": "instruction", "answer": "response"}, rep)  # the context left out: named
    assert rep.warnings[0].endswith("'data.columns.question=[instruction,context]' joins 'context' to the question, "
                                    "one per line")


def test_a_file_that_has_none_of_the_mapped_names_is_read_with_the_plain_ones(tmp_path):
    """Alpaca's records and your own question/answer file train together under one data.columns; a file that has a
    mapped name is held to the mapping."""
    alpaca = write(tmp_path, "alpaca.json", json.dumps([{"instruction": "Q1?", "input": "", "output": "A1."}]))
    mine = write(tmp_path, "mine.jsonl", json.dumps({"question": "Q2?", "answer": "A2.", "source": "Ch. 1"}))
    columns = {"question": ["instruction", "input"], "answer": "output"}
    reports = []
    records = data.load_many([str(alpaca), str(mine)], columns, reports)
    assert [(r.question, r.answer, r.source) for r in records] == [("Q1?", "A1.", ""), ("Q2?", "A2.", "Ch. 1")]
    assert reports[0].warnings == [] and reports[1].warnings == [
        f"{mine}: read with the plain field names, as it has none of the mapped ones (question='instruction' + 'input', "
        "answer='output')"]
    half = write(tmp_path, "half.json", json.dumps([{"question": "Q?", "answer": "A.", "output": ""}]))
    with pytest.raises(UserError, match=r"half.json: record 1: fields 'instruction' \+ 'input' are all missing"):
        data.load_records(half, columns)


def test_chat_transcripts_are_records(tmp_path):
    """OpenAI's {"messages": [{role, content}]} and ShareGPT's {"conversations": [{from, value}]}: a system message
    (optional), then user turns and replies in turn; the last exchange is the record's question and answer, the
    earlier ones its history. Other orders of turns are named as such."""
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    openai = write(tmp_path, "chat.jsonl", "\n".join(json.dumps(r) for r in [
        {"messages": [turn("system", "Be brief."), turn("user", "Q1?"), turn("assistant", "A1.")]},
        {"messages": [turn("user", "Q2?"), turn("assistant", "A2.")], "source": "Ch. 2"},
        {"messages": [turn("user", "a"), turn("assistant", "b"), turn("user", "c"), turn("assistant", "d")]}]))
    records = data.load_records(openai)
    assert [(r.question, r.answer, r.source, r.system, r.history) for r in records] == [
        ("Q1?", "A1.", "", "Be brief.", ()), ("Q2?", "A2.", "Ch. 2", None, ()), ("c", "d", "", None, (("a", "b"),))]
    assert records[2].history_messages() == [turn("user", "a"), turn("assistant", "b")]
    sharegpt = write(tmp_path, "sharegpt.json", json.dumps([{"conversations": [
        {"from": "human", "value": "Q3?"}, {"from": "gpt", "value": "A3."}]}]))
    assert [(r.question, r.answer) for r in data.load_records(sharegpt)] == [("Q3?", "A3.")]
    bad = write(tmp_path, "bad.jsonl", "\n".join(json.dumps(r) for r in [
        {"messages": [turn("user", "a"), turn("user", "b"), turn("assistant", "c")]},
        {"messages": [turn("user", "Q?"), {"role": "assistant", "content": ["A."]}]},
        {"messages": [turn("user", "Q?"), turn("assistant", " ")]}, {"messages": "Q? A."},
        {"messages": [turn("user", "Q?"), turn("assistant", "A.")], "source": [5]},
        {"messages": [{"role": ["user"], "content": "Q?"}, turn("assistant", "A.")]},
        {"messages": [turn("user", "a"), turn("assistant", "b"), turn("user", "c")]},
        {"messages": [turn("user", "Q?"), {"role": "assistant", "content": "A.", "weight": 0.5}]},
        {"messages": [turn("user", "Q?"), {"role": "assistant", "content": "A.", "weight": 0}]}]))
    with pytest.raises(UserError) as e:
        data.load_records(bad)
    assert str(e.value).startswith(
        f"9 invalid record(s) in {bad}: line 1: field 'messages' holds the turns user, user, assistant: a conversation "
        "is a system message (optional), then user turns and the assistant's replies in turn, ending with a reply; "
        "line 2: field 'messages' turn 2: its content must be a string, found list; line 3: field 'messages' turn 2 "
        "(assistant) is empty; line 4: field 'messages' must be a list of {role, content} objects; line 5: field "
        "'source' must be a string, found list; line 6: field 'messages' turn 1: its role must be a string, found list; "
        "line 7: field 'messages' holds the turns user, assistant, user: a conversation is a system message "
        "(optional), then user turns and the assistant's replies in turn, ending with a reply; line 8: field "
        "'messages' turn 2: its weight must be 0 (not trained) or 1, found 0.5; line 9: field 'messages' has no reply "
        "to train: every one has the weight 0.")
    weighted = write(tmp_path, "weighted.jsonl", json.dumps({"messages": [  # OpenAI's format: weight 0, not trained
        turn("user", "a"), {**turn("assistant", "b"), "weight": 0}, turn("user", "c"), turn("assistant", "d")]}))
    assert data.load_records(weighted)[0].untrained == (0,)
    sourced = write(tmp_path, "sourced.jsonl", json.dumps({"messages": [turn("user", "Q?"), turn("assistant", "A.")],
                                                          "chapter": "Ch. 5", "section": "5.3"}))
    (r,) = data.load_records(sourced, {"source": ["chapter", "section"]})  # a source read from several fields
    assert (r.question, r.source) == ("Q?", "Ch. 5\n5.3")
    trl = write(tmp_path, "trl.jsonl", "\n".join(json.dumps(r) for r in [  # TRL's conversational prompt-completion:
        {"prompt": [turn("user", "a"), turn("assistant", "b"), turn("user", "c")],
         "completion": [turn("assistant", "d")]},
        {"prompt": [turn("system", "S."), turn("user", "Q?")], "completion": [turn("assistant", "A.")]}]))
    assert [(r.question, r.answer, r.system, r.history, r.untrained) for r in data.load_records(trl)] == [
        ("c", "d", None, (("a", "b"),), (0,)), ("Q?", "A.", "S.", (), ())]  # the prompt's replies are not trained
    with pytest.raises(UserError, match=r"line 1: field 'prompt' \+ 'completion' holds the turns user: "):
        data.load_records(write(tmp_path, "prompt_only.jsonl", json.dumps({"prompt": [turn("user", "Q?")]})))
    assert data.load_records(tmp_path / "prompt_only.jsonl", required=("question",))[0].question == "Q?"
    questions = write(tmp_path, "questions.jsonl", "\n".join(json.dumps({"messages": m}) for m in [
        [turn("user", "Q?")], [turn("user", "a"), turn("assistant", "b"), turn("user", "c")]]))
    asked = data.load_records(questions, required=("question",))  # chat questions=FILE: the last user turn is asked
    assert [(r.question, r.answer, r.history) for r in asked] == [("Q?", "", ()), ("c", "", (("a", "b"),))]
    same_end = [data.Record("c", "d", history=(("a", "b"),)), data.Record("c", "d"), data.Record("c", "d")]
    assert len(data.dedup(same_end)[0]) == 2  # the same last exchange after another history is not a duplicate,
    assert data.overlap(same_end[:1], same_end[1:]) == [] and data.overlap(same_end[1:], same_end[1:2])  # nor a leak


def test_spreadsheet_headers_in_any_case_are_read_and_a_workbook_is_named(tmp_path):
    # a spreadsheet's "Question", "Answer", "Source" headers (or " question "): read without a data.columns mapping,
    # and not warned about as unknown; an exact name wins over one in another case, which is then unknown
    rep = data.FileReport("x")
    (r,) = data.load_records(write(tmp_path, "s.csv", "Question, ANSWER ,Source\nWhat is a mode?,The most common "
                                                      "value.,Ch. 1\n"), report=rep)
    assert (r.question, r.answer, r.source) == ("What is a mode?", "The most common value.", "Ch. 1") and not rep.warnings
    (r,) = data.load_records(write(tmp_path, "b.json", json.dumps([{"Question": "a?", "question": "b?", "answer": "x"}])),
                             report=rep)
    book = tmp_path / "qa.xlsx"  # a workbook (a zip file): named as such, not "not UTF-8 text"
    book.write_bytes(b"PK\x03\x04\x14\x00\x06\x00")
    with pytest.raises(UserError, match=r"qa.xlsx: a spreadsheet's own format is not read here; save it as CSV"):
        data.load_records(book)
    assert r.question == "b?" and rep.warnings == [f"{tmp_path / 'b.json'}: unknown field(s) ignored: 'Question' (a "
                                                   "value in 1 of 1 records)"]


def test_not_utf8_and_bad_jsonl_line(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes('[{"question": "Qué?", "answer": "Sí"}]'.encode("latin-1"))
    with pytest.raises(UserError, match="latin1.json: not UTF-8"):
        data.load_records(str(p))
    with pytest.raises(UserError, match=r"x.jsonl, line 2: not valid JSON"):
        data.load_records(write(tmp_path, "x.jsonl", '{"question": "Q", "answer": "A"}\n{oops\n'))


def test_labels_mask_prompt_and_train_answer_and_end_of_turn(tokenizer):
    records = data.load_records(str(TRAIN))[:8]
    ds, stats = prepare.tokenize(records, tokenizer, templates.get("chat"), max_length=512)
    assert stats.kept == 8 and stats.fast_path
    for row, rec in zip(ds, records):
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, lab in enumerate(labels) if lab != -100)
        assert all(lab == -100 for lab in labels[:first])
        assert labels[first:] == ids[first:]
        # the prompt is exactly what inference feeds the model
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": rec.question}],
                                               add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(ids[:first]) == prompt
        assert ids[:first] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        # the trained span is the answer followed by the end-of-turn token, and nothing after it
        assert tokenizer.decode(ids[first:]) == rec.answer + "<|im_end|>"
        assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    shown = prepare.show_example(ds[0], tokenizer)
    assert shown.endswith(">>>" + records[0].answer + "<|im_end|><<<")
    assert prepare.marks([ds[0]], tokenizer) == (">>>", "<<<")


def test_the_marked_example_takes_marks_that_its_text_lacks(tokenizer):
    """An answer with a Python doctest holds >>>: the trained span is shown between other marks."""
    doctest = data.Record(question="What does sum do?", answer="Adds the items.\n\n>>> sum([1, 2])\n3")
    ds, _ = prepare.tokenize([doctest], tokenizer, templates.get("chat"), max_length=512)
    shown = prepare.marks([ds[0]], tokenizer)
    assert shown == ("[[[", "]]]")
    assert prepare.show_example(ds[0], tokenizer, shown).endswith("[[[" + doctest.answer + "<|im_end|>]]]")
    both = data.Record(question="And [[[?", answer=doctest.answer)  # every row shown counts
    assert prepare.marks([ds[0], prepare.tokenize([both], tokenizer, templates.get("chat"), 512)[0][0]],
                         tokenizer) == ("{{{", "}}}")


def test_overlong_policies(tokenizer):
    records = data.load_records(str(TRAIN))[:10]
    lengths = [len(r) for r in prepare.tokenize(records, tokenizer, templates.get("chat"), 1024)[0]["input_ids"]]
    limit = sorted(lengths)[5]  # half the records are longer
    n_over = sum(n > limit for n in lengths)
    ds, st = prepare.tokenize(records, tokenizer, templates.get("chat"), limit, "truncate")
    assert st.over_max_length == st.truncated == n_over and st.dropped == 0 and len(ds) == 10
    assert max(len(x) for x in ds["input_ids"]) == limit
    ds, st = prepare.tokenize(records, tokenizer, templates.get("chat"), limit, "drop")
    assert st.dropped == n_over and len(ds) == 10 - n_over
    with pytest.raises(UserError, match=rf"{n_over} record\(s\) exceed data.max_length={limit}.*record"):
        prepare.tokenize(records, tokenizer, templates.get("chat"), limit, "error")
    # nothing left: the message names the file and why (dropped whole, or questions longer than the limit)
    short = min(lengths)
    with pytest.raises(UserError, match=rf"No record of {TRAIN} fits data.max_length={short - 1}: data.overlong=drop "
                                        rf"left out all 10 \(the shortest has {short} tokens\)"):
        prepare.tokenize(records, tokenizer, templates.get("chat"), short - 1, "drop")
    with pytest.raises(UserError, match=rf"No record of {TRAIN} fits data.max_length=8: every question alone is "
                                        rf"longer \({TRAIN}, record 1: \d+ prompt tokens;"):
        prepare.tokenize(records, tokenizer, templates.get("chat"), 8, "truncate")


def test_split_is_seeded_and_disjoint():
    records = data.load_records(str(TRAIN))
    train, val = data.split(records, 0.1, seed=1)
    assert len(val) == round(len(records) * 0.1) and len(train) + len(val) == len(records)
    assert not {r.question for r in train} & {r.question for r in val}
    assert [r.question for r in data.split(records, 0.1, seed=1)[1]] == [r.question for r in val]
    with pytest.raises(UserError, match=r"data.val_fraction=0.1 of 1 training record\(s\) leaves none to train on"):
        data.split(records[:1], 0.1, seed=1)  # (was an empty training set, then a traceback)
    with pytest.raises(UserError, match=r"data.split_by=source: only 1 source\(s\), so no split leaves training"):
        data.split([dataclasses.replace(r, source="one") for r in records[:3]], 0.1, seed=1, by="source")


def test_validation_file_beside_the_training_file_or_none(tmp_path, capsys):
    """data.val_path=auto (the default): <name>_val<suffix> beside a single training file, else no file (then
    data.val_fraction). Your own training file is never validated against the sample's validation file."""
    from test_config import make
    from sft_recipes import train

    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in json.loads(TRAIN.read_text())[:40]))
    assert data.data_specs(str(TRAIN), "auto") == (str(TRAIN), str(VAL))  # the sample data's pair
    assert data.data_specs(str(mine), "auto") == (str(mine), None)
    assert data.data_specs([str(mine)], "auto") == ([str(mine)], None)
    assert data.data_specs(str(mine), "x.json") == (str(mine), "x.json")
    # a folder (or glob, or list): each <name>_val file beside its <name> file validates instead of training
    assert data.data_specs(str(TRAIN.parent), "auto") == ([str(TRAIN)], str(VAL))
    assert data.data_specs(str(TRAIN.parent / "*.json"), "auto") == ([str(TRAIN)], str(VAL))
    assert data.data_specs([str(mine), str(VAL)], "auto") == ([str(mine), str(VAL)], None)  # no pair: as given
    assert data.data_specs(str(TRAIN.parent), None) == (str(TRAIN.parent), None)

    train.run(make(f"output_dir={tmp_path / 'a'}", f"data.train_path={mine}", "dry_run=true"))
    assert "No validation data: no <name>_val file beside the training data" in capsys.readouterr().out
    (tmp_path / "mine_val.jsonl").write_text(json.dumps(json.loads(VAL.read_text())[0]) + "\n")
    train.run(make(f"output_dir={tmp_path / 'b'}", f"data.train_path={mine}", "dry_run=true", "data.val_fraction=0.1",
                   "data.split_by=source"))
    out = capsys.readouterr().out
    assert f"Validation data: {tmp_path / 'mine_val.jsonl'} (beside the training file" in out
    assert "Validation data: 1 record, kept 1" in out and "Training data: 40 records" in out
    assert (f"warning: data.val_fraction=0.1 and data.split_by=source are not used: {tmp_path / 'mine_val.jsonl'} "
            "validates (with data.val_path=null they split the training data)") in out  # (settings read by nothing)
    train.run(make(f"output_dir={tmp_path / 'c'}", f"data.train_path={TRAIN.parent}", "dry_run=true"))
    out = capsys.readouterr().out  # the sample folder: sft_sample_val.json validates, as beside the single file
    assert f"Validation data: {VAL} (beside" in out and "Training data: 112 records" in out
    train.run(make(f"output_dir={tmp_path / 'd'}", f"data.train_path={TRAIN.parent}", "data.val_path=null",
                   "dry_run=true"))
    assert f"warning: {VAL}: trained on, though its name says held-out data" in capsys.readouterr().out


@pytest.mark.parametrize("name,held_out", [
    ("test.jsonl", True), ("qa_val.json", True), ("qa-dev.csv", True), ("validation.parquet", True),
    ("chapter3.eval.json", True), ("held_out.json", True), ("train.json", False), ("sft_sample.json", False),
    ("interval_estimates.json", False), ("latest.json", False), ("contest.jsonl", False)])
def test_training_files_named_as_held_out_data_are_flagged(name, held_out):
    assert (data.held_out_warning(name) is not None) is held_out
