"""How good is the dry run's memory estimate? Estimate, then train for real with the same config, and compare.

    python bench/memory_estimate.py [OVERRIDES...]     # default: the embedded model, preset=default, 1 epoch

Prints both figures and the relative error, and writes bench/results/memory_estimate.json. On a CPU the
measured figure is the peak resident size during training minus the size before the model was loaded.
"""
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(overrides):
    from hydra import compose, initialize_config_dir

    from sft_recipes import conf_dir, config, models, report, train

    config.register()
    out = Path(tempfile.mkdtemp())
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={out}", "train.epochs=1", "train.report_to=[]", *overrides])
    path = models.resolve_config(cfg.model)
    data = train.prepare_data(cfg, models.load_tokenizer(path))
    longest = min(cfg.data.max_length, data.train_stats.summary()["tokens_max"])
    _, _, parts = report.memory_estimate(cfg, path, longest)
    train.run(cfg)
    measured = json.loads((out / "metrics.json").read_text())["peak_memory_gib"]
    estimated = parts["total"] / 2**30
    result = {"overrides": overrides, "estimated_gib": round(estimated, 3), "measured_gib": measured,
              "relative_error": round((estimated - measured) / measured, 3),
              "terms_gib": {k: round(v / 2**30, 3) for k, v in parts.items()}}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "memory_estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
