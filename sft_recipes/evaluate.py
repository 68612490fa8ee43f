"""`python -m sft_recipes.evaluate run_dir=RUN [data=TEST_FILE]`: is the adapter better than the base model?

On the run's validation split (or on other question/answer files: a test set that chose nothing), the loss and
perplexity of the base model and of base + adapter, then greedy answers from both (the run's chat template,
stopping at the end-of-turn token; `repetition_penalty=1.1` as chat takes it; a base model whose chat template can
turn reasoning off, Qwen3's, asked with it off) scored against the references with ROUGE-L, token F1 and exact
match (torchmetrics' ROUGE and SQuAD metrics), with their mean length in words beside the references'. Writes
RUN/eval/ (for data=FILE: RUN/eval_<file name>/): metrics.json, report.md, predictions.jsonl, metrics.png.
run_dir=RUN/checkpoint-N evaluates that checkpoint (a finished run's or one still training) into
RUN/eval_checkpoint-N/ (RUN/eval_<file name>_checkpoint-N/).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List

USAGE = ("python -m sft_recipes.evaluate run_dir=RUN[/checkpoint-N]|latest [data=FILE] [max_new_tokens=256] "
         "[limit=0] [batch_size=8] [repetition_penalty=1]")
DEFAULTS = {"run_dir": None, "data": "", "max_new_tokens": 256, "limit": 0, "batch_size": 8, "repetition_penalty": 1.0}


def scores(prediction: str, reference: str) -> Dict[str, float]:
    """ROUGE-L F-measure, SQuAD token F1 and exact match (after SQuAD's normalization), each in [0, 1]."""
    from torchmetrics.functional.text import rouge_score
    from torchmetrics.functional.text.squad import squad

    rouge = float(rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"])
    sq = squad([{"prediction_text": prediction, "id": "0"}],
               [{"answers": {"answer_start": [0], "text": [reference]}, "id": "0"}])
    return {"rouge_l": rouge, "token_f1": float(sq["f1"]) / 100, "exact_match": float(sq["exact_match"]) / 100}


def mean(rows: List[Dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else 0.0


def words(texts: List[str]) -> float:
    """Mean words per text: are the answers as long as the data's (a base model's often run on)?"""
    return round(sum(len(t.split()) for t in texts) / len(texts), 1)


KEYS = ("loss", "perplexity", "rouge_l", "token_f1", "exact_match", "stopped_at_end_of_turn", "words")


def table(m: dict) -> List[str]:
    """The base vs fine-tuned table of an evaluation's metrics.json (report.md, the model card)."""
    label = lambda k: (f"answer length, words (references: {m['reference_words']})" if k == "words"  # noqa: E731
                       else k.replace("_", " "))
    return ["| metric | base | fine-tuned |", "| --- | --- | --- |"] + [
        f"| {label(k)} | {m['base'][k]} | {m['fine_tuned'][k]} |" for k in KEYS if k in m["base"]]


def answers_made(m: dict) -> str:
    """How an evaluation's answers were made, as its report.md and the model card say it."""
    penalty = m.get("repetition_penalty", 1)
    asked = ", ".join(f"{k}={v}" for k, v in m.get("base_asked_with", {}).items())
    return f"greedy answers of at most {m['max_new_tokens']} tokens" + (
        f", repetition penalty {penalty}" if penalty != 1 else "") + (
        f"; the base model asked with its chat template's {asked}, answering without reasoning first" if asked else "")


def out_dir(run_dir: Path, data) -> Path:
    """RUN/eval for the validation split, RUN/eval_<name of the first file> for data=FILE; for run_dir=RUN/checkpoint-N
    RUN/eval_checkpoint-N and RUN/eval_<name>_checkpoint-N."""
    from .runs import is_checkpoint, run_of

    name = "eval"
    if data:
        from .data import expand, plain

        name += f"_{plain(expand(data)[0]).stem}"
    return run_of(run_dir) / (f"{name}_{Path(run_dir).name}" if is_checkpoint(run_dir) else name)


def evaluate(run_dir, max_new_tokens: int = 256, limit: int = 0, batch_size: int = 8, data=None,
             repetition_penalty: float = 1.0) -> dict:
    from . import card, runs
    from .errors import UserError
    from .prepare import thinking_off

    if repetition_penalty <= 0:
        raise UserError(f"repetition_penalty={repetition_penalty}: it must be positive (1: none; 1.1 makes a small "
                        "model's greedy loops less likely).")
    run_dir = Path(run_dir)
    cfg = runs.config(run_dir)
    tok = runs.tokenizer(run_dir)
    val_records, rows = runs.validation(cfg, tok, limit, data)
    if not val_records:
        raise UserError(f"The run {run_dir} has no validation split (data.val_path or data.val_fraction); "
                        "evaluate on a file with data=PATH.")
    seen, earlier = 0, runs.ancestors(cfg)
    if data or earlier:  # questions the adapter was trained on make the scores optimistic: count them
        from .data import overlap

        trained = (runs.training_records(cfg) if data else []) + [r for a in earlier for r in runs.training_records(a)]
        seen = len(overlap(trained, val_records))
        if seen:
            print(f"warning: {seen} of the {len(val_records)} questions in {data or 'the validation split'} also "
                  "appear in the training data" + (" (of this run or of the runs whose adapter it trained further, "
                                                   "model.adapter)" if earlier else "")
                  + ": their scores will be optimistic")
    longer = references_over(tok, val_records, max_new_tokens)
    if longer:
        print(f"warning: {longer}", file=sys.stderr)
    model = runs.adapter_model(cfg, run_dir)
    conversations = [runs.record_messages(cfg, r) for r in val_records]  # as trained
    greedy, direct = runs.sampling_args(repetition_penalty=repetition_penalty), thinking_off(tok)
    with model.disable_adapter():
        base_loss = runs.mean_loss(model, rows)
        base_answers = runs.generate(model, tok, conversations, max_new_tokens, batch_size, greedy,
                                     progress="base model", chat_args=direct)
    tuned_loss = runs.mean_loss(model, rows)
    tuned_answers = runs.generate(model, tok, conversations, max_new_tokens, batch_size, greedy, progress="fine-tuned")

    predictions, base_scores, tuned_scores = [], [], []
    for r, (base, base_stop), (tuned, tuned_stop) in zip(val_records, base_answers, tuned_answers):
        b, t = scores(base, r.answer), scores(tuned, r.answer)
        base_scores.append(b)
        tuned_scores.append(t)
        predictions.append({**({"system": r.system} if r.system is not None else {}),
                            **({"history": r.history_messages()} if r.history else {}),
                            "question": r.question, "reference": r.answer, "source": r.source,
                            "base": base, "base_stopped": base_stop, "fine_tuned": tuned,
                            "fine_tuned_stopped": tuned_stop, "base_scores": b, "fine_tuned_scores": t})
    summary = lambda loss, sc, answers: {  # noqa: E731
        "loss": round(loss, 4), "perplexity": round(math.exp(loss), 3),
        **{k: round(mean(sc, k), 4) for k in ("rouge_l", "token_f1", "exact_match")},
        "stopped_at_end_of_turn": round(sum(s for _, s in answers) / len(answers), 3),
        "words": words([a for a, _ in answers])}
    metrics = {"run_dir": str(runs.run_of(run_dir)), "adapter": runs.adapter_dir(run_dir).name,
               "data": data or "validation split", "records": len(val_records),
               "also_in_training": seen, "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty,
               **({"base_asked_with": direct} if direct else {}),
               "references_cut": longer,
               "reference_words": words([r.answer for r in val_records]),
               "base": summary(base_loss, base_scores, base_answers),
               "fine_tuned": summary(tuned_loss, tuned_scores, tuned_answers)}
    write(out_dir(run_dir, data), metrics, predictions)
    if not runs.is_checkpoint(run_dir):
        card.write(run_dir, cfg)  # the adapter's card gains the base vs fine-tuned table
    return metrics


def references_over(tok, records, max_new_tokens: int) -> str:
    """Reference answers longer than max_new_tokens (with their end-of-turn token): an answer like them is cut there,
    which lowers its scores and its share that stops (what this says, else "")."""
    lengths = [len(ids) + 1 for ids in tok([r.answer for r in records], add_special_tokens=False)["input_ids"]]
    if not (over := sum(n > max_new_tokens for n in lengths)):
        return ""
    return (f"{over} of the {len(records)} reference answers are longer than max_new_tokens={max_new_tokens} tokens "
            f"(the longest: {max(lengths)}): answers like them are cut there, which lowers their scores and the share "
            f"that stops at the end-of-turn token; max_new_tokens={max(lengths)} lets them end")


def write(out: Path, metrics: dict, predictions: List[dict]) -> None:
    from .report import question_lines

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    at = f" at {metrics['adapter']}" if metrics["adapter"] != "final_model" else ""
    lines = [f"# Evaluation of {metrics['run_dir']}{at}", "",
             f"{metrics['records']} records ({metrics['data']}); {answers_made(metrics)}."
             + (f" {metrics['also_in_training']} of the questions also appear in the training data."
                if metrics["also_in_training"] else "")
             + (f" Note: {metrics['references_cut']}." if metrics.get("references_cut") else ""),
             "", *table(metrics), "", "## Sample answers", ""]
    for p in predictions[:10]:
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines += question_lines(p["question"], p.get("history", []), cell, p.get("system")) + [
            f"- reference: {cell(p['reference'])}", f"- base: {cell(p['base'])}",
            f"- fine-tuned: {cell(p['fine_tuned'])}", ""]
    (out / "report.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, t, shown = metrics["base"], metrics["fine_tuned"], ("loss", "rouge_l", "token_f1", "exact_match")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(shown))
    ax.bar([i - 0.2 for i in x], [b[k] for k in shown], 0.4, label="base", color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], [t[k] for k in shown], 0.4, label="fine-tuned", color="#4477aa")
    ax.set_xticks(list(x), [k.replace("_", " ") for k in shown])
    ax.set_title(f"{metrics['data']}: base vs fine-tuned (loss: lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)


def _cli(argv):
    from .runs import parse_args

    args = parse_args(argv, DEFAULTS, USAGE, __doc__)
    m = evaluate(args["run_dir"], args["max_new_tokens"], args["limit"], args["batch_size"], args["data"] or None,
                 args["repetition_penalty"])
    for name in ("base", "fine_tuned"):
        print(f"{name:>10}: " + ", ".join(f"{k} {v}" for k, v in m[name].items()))
    print(f"Report: {out_dir(Path(args['run_dir']), args['data']) / 'report.md'}")


if __name__ == "__main__":
    from .runs import main_guard

    sys.exit(main_guard(_cli))
