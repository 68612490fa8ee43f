"""The model card: RUN/final_model/README.md (and RUN/merged/README.md), written from the run's own files.

PEFT leaves an empty template in the adapter folder, and TRL's card names the base model `None` when it was
loaded from a local folder. Ours says what someone who is handed the folder needs: the base model, how the
adapter was trained (weights, LoRA, data, schedule), what it reached (losses; base vs fine-tuned once
`sft_recipes.evaluate` has run), code that loads it and answers a question, and the run's full config.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from . import build, config, evaluate
from .models import resolve_config, source_gguf

PACKAGES = ("sft-recipes", "trl", "transformers", "peft", "torch", "bitsandbytes", "datasets")


def hub_id(name: str) -> Optional[str]:
    """`name` if it is a hub id (owner/name) rather than a local folder, else None."""
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists() else None


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def weights(cfg) -> str:
    q = cfg.quantization
    if q.bits == 4:
        return (f"4-bit {q.quant_type.upper()}{' with double quantization' if q.double_quant else ''}, "
                f"{q.compute_dtype} compute (QLoRA)")
    return "8-bit (bitsandbytes LLM.int8)" if q.bits == 8 else f"{cfg.model.dtype}, not quantized"


def system_prompt(cfg, template) -> Optional[str]:
    """The system prompt the run trained with: data.system_prompt, else the template's own (None: none)."""
    return cfg.data.system_prompt if cfg.data.system_prompt is not None else template.system


def usage(cfg, base: str, folder: Path, merged: bool) -> str:
    """Python that loads the model as it was trained and answers one question with the run's prompt format."""
    from .train import template_of

    template, q, dtype = template_of(cfg), cfg.quantization, f"torch.{cfg.model.dtype}"
    user = ("question" if template.user == "{question}"
            else f"{_s(template.user)}.format(question=question, source=source)")
    system = system_prompt(cfg, template)
    messages = ([f'{{"role": "system", "content": {_s(system)}}}'] if system else []) + [
        f'{{"role": "user", "content": {user}}}']
    where = _s(str(folder.resolve()))
    if merged:
        lines = ["import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f"path = {where}  # this folder", "tokenizer = AutoTokenizer.from_pretrained(path)",
                 f"model = AutoModelForCausalLM.from_pretrained(path, dtype={dtype}).eval()"]
    else:
        quant = {4: ["quantization_config=BitsAndBytesConfig(  # as trained; leave it out to load "
                     f"{cfg.model.dtype} weights",
                     f"    load_in_4bit=True, bnb_4bit_quant_type={_s(q.quant_type)}, "
                     f"bnb_4bit_use_double_quant={q.double_quant},",
                     f"    bnb_4bit_compute_dtype=torch.{q.compute_dtype}))"],
                 8: ["quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # as trained"]}.get(q.bits)
        lines = ["import torch", "from peft import PeftModel",
                 "from transformers import AutoModelForCausalLM, AutoTokenizer"
                 + (", BitsAndBytesConfig" if quant else ""), "",
                 f"base_id = {_s(base)}", f"adapter = {where}  # this folder (or its hub id once pushed)",
                 "tokenizer = AutoTokenizer.from_pretrained(adapter)  # carries the chat template used in training",
                 f"base = AutoModelForCausalLM.from_pretrained(base_id, dtype={dtype}" + (",", ")")[not quant],
                 *(f"    {line}" for line in quant or []),
                 "model = PeftModel.from_pretrained(base, adapter).eval()"]
    lines += ["", 'question = "Your question here"']
    if "{source}" in template.user:
        lines += ['source = ""  # the template puts it in the prompt']
    lines += [f"messages = [{', '.join(messages)}]",
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
              "                                       return_dict=True).to(model.device)",
              *answer_lines(folder, merged)]
    return "\n".join(lines)


def answer_lines(folder: Path, merged: bool) -> list:
    """generate() and the answer printed, as the card's code does them: where the chat template ends a reply with a
    token that is not the tokenizer's eos_token (Gemma's <end_of_turn>, a Qwen base model's <|im_end|>), generate()
    names that token too (a merged model's generation_config holds it already); where the template writes a
    reasoning block before the reply (Qwen3's), the answer printed is what follows it."""
    from transformers import AutoTokenizer

    from .prepare import reasoning_end, turn_end

    line = "out = model.generate(**inputs, max_new_tokens=256, do_sample=False)"
    reply = "tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True)"
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return [line, f"print({reply})"]
    generate = [line]
    if not merged and (end := turn_end(tok)) not in (None, tok.eos_token):
        generate = [line[:-1] + f",  # a reply ends at {end}", "                     eos_token_id=["
                    f"tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids({_s(end)})])"]
    if not (reasoned := reasoning_end(tok)):
        return generate + [f"print({reply})"]
    return generate + [f"reply = {reply}", f"print(reply.split({_s(reasoned)})[-1].strip())  # the answer, after the "
                       "reasoning block that the chat template puts first"]


def gguf_usage(cfg, gguf: str) -> list:
    """How to run the GGUF file: it holds the tokenizer and the chat template, not the system prompt."""
    from .train import template_of

    template = template_of(cfg)
    system = system_prompt(cfg, template)
    fmt = f" Questions were asked as `{template.user}`." if template.user != "{question}" else ""
    return [f"`{gguf}` is this model for llama.cpp, Ollama or LM Studio: the tokenizer and settings of the base "
            f"model's GGUF file, this run's chat template and the merged weights.{fmt} With llama.cpp:", "",
            "```sh", f"llama-cli -m {gguf} -cnv" + (f" -sys {shlex.quote(system)}" if system else ""), "```", "",
            "With Ollama, a `Modelfile` beside it, then `ollama create my-model -f Modelfile`:", "", "```",
            f"FROM ./{gguf}", *([f'SYSTEM """{system}"""'] if system else []), "```", ""]


def table(rows) -> list:
    return ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows if v is not None)]


def render(run_dir: Path, cfg, merged: bool = False) -> str:
    run_dir = Path(run_dir)
    folder = run_dir / ("merged" if merged else "final_model")
    m = read_json(run_dir / "metrics.json") or {}
    stats = read_json(run_dir / "data_stats.json") or {}
    evals = [read_json(p) for p in sorted(run_dir.glob("eval*/metrics.json"))]  # eval/ (validation), eval_<file>/
    evals = [e for e in evals if e.get("adapter", "final_model") == "final_model"]  # not eval_checkpoint-N/
    merge = read_json(run_dir / "merged" / "merge_report.json") if merged else None
    adapter = read_json(run_dir / "final_model" / "adapter_config.json") or {}
    hub = hub_id(cfg.model.name_or_path)
    gguf_base = cfg.model.name_or_path.endswith(".gguf")
    base = hub or cfg.model.name_or_path
    base_id = resolve_config(cfg.model) if gguf_base else base  # the converted folder loads, the GGUF file not
    t, lora = cfg.train, cfg.lora

    gguf = merge.get("gguf_file") if merge else None
    tags = (["lora"] + (["qlora"] if cfg.quantization.bits == 4 else []) if not merged else []) + [
        "sft", "trl", "sft-recipes"] + (["gguf"] if gguf else [])
    meta = {"library_name": "transformers" if merged else "peft", "pipeline_tag": "text-generation", "tags": tags}
    if hub:
        meta = {"base_model": hub, **({"base_model_relation": "finetune"} if merged else {}), **meta}
        if not merged:
            tags.insert(0, f"base_model:adapter:{hub}")
    what = "Model" if merged else "LoRA adapter"
    lines = ["---", OmegaConf.to_yaml(OmegaConf.create(meta)).strip(), "---", "",
             f"# {what} fine-tuned from {base}", ""]

    train, val = stats.get("train", {}), stats.get("validation")
    spec = cfg.data.train_path
    files = [spec] if isinstance(spec, str) else list(spec or [])
    trainable, weights_file = None, run_dir / "final_model" / "adapter_model.safetensors"
    if weights_file.exists():
        from safetensors import safe_open

        with safe_open(str(weights_file), "pt") as f:
            trainable = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    lines += [(f"Trained with sft-recipes (TRL `SFTTrainer`) on {train.get('kept', '?')} "
               f"question/answer pairs" + (f" from {', '.join(f'`{p}`' for p in files[:3])}"
                                             + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
                                             if files else "") + ".")
              + (" The LoRA adapter is merged into the base weights: load it with plain `transformers`."
                 if merged else ""), ""]
    if gguf_base and not merged:
        lines += [f"The base weights in training were the GGUF file `{cfg.model.name_or_path}`, converted to "
                  f"safetensors in `{base_id}`: the folder that `base_id` names.", ""]
    elif source_gguf(cfg.model) and not merged:  # (the embedded model)
        lines += [f"The base weights in training were `{cfg.model.gguf_file}` from the `{cfg.model.embedded}` pip "
                  f"package, converted to safetensors (here `{resolve_config(cfg.model)}`; `python -m "
                  "sft_recipes.check` prints it): use that folder as `base_id` to load exactly the weights the "
                  "adapter was trained against.", ""]

    lines += ["## Results", ""] + table([
        ("final train loss", _r(m.get("final_train_loss"))),
        ("best validation loss", _r(m.get("best_eval_loss"))),
        ("saved weights", f"step {m['final_model_step']} of {m['global_step']}"
         + (" (the lowest validation loss)" if m["final_model_step"] != m["global_step"] else "")
         if "final_model_step" in m else None),
        ("merged vs adapter validation loss", f"{merge['merged_loss']} vs {merge['adapter_loss']}"
         if merge and "merged_loss" in merge else None),
        (f"`{gguf}` validation loss", merge.get("gguf_loss") if gguf else None),
    ]) + [""]
    for ev in evals:
        data = ev.get("data", "validation split")
        seen = f"; {ev['also_in_training']} of them also in the training data" if ev.get("also_in_training") else ""
        where = "of the validation split" if data == "validation split" else f"from `{data}`"
        lines += [f"On {ev['records']} questions {where}{seen} (`python -m sft_recipes.evaluate`, "
                  f"{evaluate.answers_made(ev)}):", "",
                  *evaluate.table(ev), ""]

    lines += ["## Use it", "", "```python", usage(cfg, base_id, folder, merged), "```", ""]
    if gguf:
        lines += gguf_usage(cfg, gguf)

    targets = adapter.get("target_modules") or list(lora.target_modules)
    lines += ["## Training", ""] + table([
        ("base model", f"`{base}`" + (f" (revision {cfg.model.revision})" if cfg.model.revision else "")),
        ("started from", f"the adapter `{cfg.model.adapter}`" if cfg.model.adapter else None),
        ("base weights", weights(cfg)),
        ("merged", f"into the {merge['merged_into']}, saved in {merge['dtype']}" if merge else None),
        ("LoRA", ("DoRA, " if lora.use_dora else "") + ("rsLoRA scaling, " if lora.use_rslora else "")
                 + f"r={adapter.get('r', lora.r)}, alpha={adapter.get('lora_alpha', build.lora_alpha(lora))}, dropout "
                 f"{lora.dropout} on {', '.join(sorted(targets))}"
                 + (f" (not in `{adapter['exclude_modules']}`)" if adapter.get("exclude_modules") else "")
                 + (f", {OmegaConf.to_container(lora.peft_args)}" if lora.peft_args else "")
                 + (f"; {trainable:,} trainable parameters" if trainable else "")),
        ("data", (f"{train.get('kept')} training pairs ({train.get('truncated', 0)} answers cut at "
                  f"{cfg.data.max_length} tokens, {train.get('dropped', 0)} dropped)"
                  + (f"; {val.get('kept')} validation pair{'' if val.get('kept') == 1 else 's'}" if val else ""))
         if train else None),
        ("prompt", f"template `{cfg.data.template}`" + (f", system prompt {cfg.data.system_prompt!r}"
                                                       if cfg.data.system_prompt is not None else "")),
        ("schedule", f"{m.get('global_step', '?')} steps ("
                     + (f"train.max_steps={t.max_steps}" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)")
                     + f"), batch {t.batch_size} x {t.grad_accum} accumulation, lr {t.lr:g} {t.scheduler}"
                     + (f" (LoRA+: B at {t.loraplus_lr_ratio:g}x)" if t.loraplus_lr_ratio else "")
                     + f", warmup ratio {t.warmup_ratio:g}"),
        ("seed", cfg.seed),
        ("time", f"{m['wall_s']:g} s, {m.get('trained_tokens_per_s')} trained tokens/s, peak memory "
                 f"{m.get('peak_memory_gib')} GiB" if "wall_s" in m else None),
    ]) + [""]
    versions = ", ".join(f"{p} {v}" for p in PACKAGES if (v := _version(p)))
    resolved = config.recorded(cfg, resolve=False)
    lines += [f"Versions: {versions}.", "", "<details><summary>The run's full config</summary>", "",
              "```yaml", resolved.strip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def write(run_dir, cfg, merged: bool = False) -> Path:
    """Write the card into RUN/final_model (or RUN/merged) atomically, replacing PEFT's empty template."""
    path = Path(run_dir) / ("merged" if merged else "final_model") / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(render(run_dir, cfg, merged))
    os.replace(tmp, path)
    return path


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _s(text: str) -> str:
    """A Python string literal."""
    return json.dumps(text, ensure_ascii=False)


def _r(x) -> Optional[str]:
    return None if x is None else f"{x:.4f}"


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
