"""Writes a second, harder data set: "What does json.dumps do?" answered by the function's docstring, for the
public callables of a few standard-library modules (245 records with Python 3.11; long, list-like answers that a
135M model learns to loop on). README, Troubleshooting, "Answers that repeat themselves" measured on it:

    python tools/docstring_data.py /tmp/pydocs.json
    python -m sft_recipes preset=low_memory lora.r=32 data.train_path=/tmp/pydocs.json data.val_fraction=0.1 \\
        eval.after_train=true
"""
import importlib
import inspect
import json
import random
import sys

MODULES = ("json", "os.path", "shutil", "itertools", "functools", "collections", "statistics", "math", "re",
           "pathlib", "random", "string", "textwrap", "heapq", "bisect")


def records() -> list:
    out = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in dir(module):
            obj = getattr(module, attr)
            doc = inspect.getdoc(obj) if callable(obj) and not attr.startswith("_") else None
            if doc and len(doc) >= 40:
                out.append({"question": f"What does {name}.{attr} do?", "answer": doc, "source": f"Python {name} docs"})
    random.Random(0).shuffle(out)
    return out


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "pydocs.json"
    data = records()
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"{len(data)} records -> {path}")
