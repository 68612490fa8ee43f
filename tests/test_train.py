"""End-to-end runs in-process: the tiny random model (fast) and the real embedded model with 4-bit QLoRA."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TRAIN, VAL, loss_history
from test_config import make
from sft_recipes import train
from sft_recipes.errors import UserError


def run(tmp_path, model_dir, *overrides, embedded=False):
    model = [] if embedded else [f"model.name_or_path={model_dir}", "model.embedded=null"]
    cfg = make(f"output_dir={tmp_path}", f"data.train_path={TRAIN}", f"data.val_path={VAL}", "train.report_to=[]",
               *model, *overrides)
    return train.run(cfg)


def log_lines(run_dir):
    return [line for line in (Path(run_dir) / "training_log.txt").read_text().splitlines() if not line.startswith("#")]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_tiny_model_end_to_end(tmp_path, tiny_dir, quant):
    final = run(tmp_path, tiny_dir, "preset=fast_test", f"quantization={quant}", "train.max_steps=6",
                "train.save_steps=3", "train.logging_steps=1", "train.lr=2e-3")
    assert final == tmp_path / "final_model"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (final / name).exists(), name
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 16
    for ckpt in ("checkpoint-3", "checkpoint-6"):
        assert (tmp_path / ckpt / "adapter_model.safetensors").exists()
        assert (tmp_path / ckpt / "optimizer.pt").exists() and (tmp_path / ckpt / "trainer_state.json").exists()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    lines = log_lines(tmp_path)
    steps = [line for line in lines if "loss=" in line and "eval_loss" not in line]
    assert len(steps) == 6 and all("lr=" in s and "grad_norm=" in s for s in steps)
    assert all("tokens/s=" in s for s in steps[1:])
    first = float(steps[0].split("loss=")[1].split()[0])
    assert abs(first - math.log(49152)) < 0.3  # random init: about uniform over the vocabulary
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["final_eval_loss"] is not None
    assert metrics["final_train_loss"] < first
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*")) or True  # report_to=[] here: no events


def test_the_last_step_is_logged(tmp_path, tiny_dir):
    """Trainer logs every train.logging_steps only; the last step is logged too, so the final train loss is its."""
    run(tmp_path, tiny_dir, "preset=fast_test", "train.max_steps=3", "train.logging_steps=2", "data.val_path=null")
    assert [line.split()[0] for line in log_lines(tmp_path)] == ["step=1", "step=2", "step=3"]  # (first step too)
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["final_train_loss"] == state["log_history"][-1]["loss"] and state["log_history"][-1]["step"] == 3
    assert metrics["max_steps"] == 3


def test_compiled_layers_train_like_eager(tmp_path, tiny_dir):
    """train.compile=true (each decoder layer compiled in place, QLoRA + gradient checkpointing), both ways of
    train.compile_checkpoint: the same loss curve as eager, the same adapter keys, and one compiled graph shared
    by the layers."""
    import torch._dynamo.utils

    common = ["preset=fast_test", "quantization=nf4", "lora.dropout=0", "train.max_steps=4", "train.save_steps=4",
              "train.logging_steps=1", "train.lr=2e-3", "train.gradient_checkpointing=true", "data.val_path=null"]
    run(tmp_path / "eager", tiny_dir, *common)
    eager = loss_history(tmp_path / "eager")
    keys = lambda d: set(load_file(d / "final_model" / "adapter_model.safetensors"))
    for way in ("traced", "around"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run(tmp_path / way, tiny_dir, *common, "train.compile=true", f"train.compile_checkpoint={way}")
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # one graph for the first length, one with a dynamic length after the second: not one per layer or step
        assert 1 <= graphs <= 3, (way, graphs)
        compiled = loss_history(tmp_path / way)
        assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
        assert all(abs(eager[s] - compiled[s]) < 1e-3 * eager[s] for s in eager), (way, eager, compiled)  # bf16
        assert keys(tmp_path / "eager") == keys(tmp_path / way)


@pytest.mark.slow
def test_embedded_model_qlora_learns_and_adapter_loads(embedded_run, embedded_dir, tokenizer):
    """4-bit NF4 QLoRA on the real SmolLM2-135M: loss goes down, the adapter loads with plain peft and generates."""
    tmp_path, final = embedded_run, embedded_run / "final_model"
    history = json.loads((tmp_path / "checkpoint-40" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] - 0.3, losses
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(final)
    model = PeftModel.from_pretrained(base, final)
    assert list(model.peft_config) == ["default"]
    weights = load_file(final / "adapter_model.safetensors")
    assert len(weights) == 30 * 4 * 2 and not any(".base_model.model.base_model" in k for k in weights)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the median?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=200, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    assert len(text.split()) >= 5
    assert new[-1].item() == tok.eos_token_id  # generation stops at the end-of-turn token


def test_final_model_best_and_early_stopping(tmp_path, tiny_dir, capsys):
    """A learning rate at which the validation loss rises after an early low. train.final_model=best:
    final_model/ holds the best checkpoint's adapter, which rotation keeps, and every saved trainer state points at
    its published folder (what a resumed run reads). train.early_stopping_patience stops the run that many
    validations after the best one; final_model=last keeps the last step's weights."""
    adapter = lambda d: load_file(d / "adapter_model.safetensors")  # noqa: E731
    # The setup this test needs: the lowest validation loss by step 6 of 12, so that the early-stopped run below
    # stops before the end. The tiny random model's validation curve is nearly flat and its wiggles differ between
    # CPUs: take the first learning rate that gives one here.
    for lr in ("1e-2", "3e-2", "1e-1", "5e-2"):
        common = ["preset=fast_test", "train.max_steps=12", "train.save_steps=2", "train.logging_steps=1",
                  f"train.lr={lr}"]
        best_run = tmp_path / f"best_{lr}"
        run(best_run, tiny_dir, *common, "train.final_model=best", "train.save_total_limit=2")
        state = json.loads((best_run / "checkpoint-12" / "trainer_state.json").read_text())
        evals = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}
        best = min(evals, key=evals.get)
        if best <= 6:
            break
    assert sorted(evals) == [2, 4, 6, 8, 10, 12] and best <= 6, evals
    metrics = json.loads((best_run / "metrics.json").read_text())
    assert metrics["final_model_step"] == best and metrics["best_checkpoint"] == f"checkpoint-{best}"
    assert state["best_model_checkpoint"] == str(best_run / f"checkpoint-{best}")  # not the .staging folder
    kept = sorted(p.name for p in best_run.glob("checkpoint-*"))
    assert kept == sorted([f"checkpoint-{best}", "checkpoint-12"]), kept  # save_total_limit=2: the best + newest
    final, at_best = adapter(best_run / "final_model"), adapter(best_run / f"checkpoint-{best}")
    assert final.keys() == at_best.keys() and all(torch.equal(final[k], at_best[k]) for k in final)
    assert {v.dtype for v in final.values()} == {torch.bfloat16}  # as trained (QLoRA), not upcast by the reload
    assert "the weights of step" in capsys.readouterr().out

    stopped = tmp_path / "stopped"
    run(stopped, tiny_dir, *common, "train.early_stopping_patience=2")
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert metrics["global_step"] == best + 2 * 2 < 12  # two validations without a lower loss, then stop
    assert metrics["final_model_step"] == metrics["global_step"] and metrics["best_checkpoint"] == f"checkpoint-{best}"
    last = adapter(stopped / f"checkpoint-{metrics['global_step']}")
    assert all(torch.equal(adapter(stopped / "final_model")[k], last[k]) for k in last)
    assert f"Early stopping at step {best + 4}: no lower validation loss in 2 validation(s) since step {best}" \
        in capsys.readouterr().out


def test_resumed_run_keeps_the_best_checkpoint_and_the_early_stopping_count(tmp_path, tiny_dir):
    """Cut a run with train.final_model=best and early stopping back to an earlier checkpoint and resume it: it
    stops at the same step (the count of validations without improvement was restored) and saves the same best
    adapter."""
    # The setup this test needs: a run that stops early. The tiny random model's validation curve is nearly flat, its
    # wiggles differ between CPUs (1e-1 early-stopped on one machine and ran to the end on another): take the first
    # learning rate whose run stops early here.
    for lr in ("3e-2", "1e-1", "1e-2", "5e-2"):
        common = ["preset=fast_test", "train.max_steps=16", "train.save_steps=2", "train.logging_steps=1",
                  f"train.lr={lr}", "train.final_model=best", "train.early_stopping_patience=3",
                  "train.save_total_limit=null"]
        shutil.rmtree(tmp_path)
        run(tmp_path, tiny_dir, *common)
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        stop, best = metrics["global_step"], metrics["final_model_step"]
        if stop < 16:
            break
    assert stop == best + 6 < 16, metrics  # three validations without a lower loss after the best, then stop
    final = load_file(tmp_path / "final_model" / "adapter_model.safetensors")
    for step in (stop, stop - 2):  # as if the run had been killed after checkpoint stop-4
        shutil.rmtree(tmp_path / f"checkpoint-{step}")
    for name in ("final_model", "metrics.json"):
        shutil.rmtree(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).unlink()
    run(tmp_path, tiny_dir, *common, "resume_from=auto")
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert (resumed["global_step"], resumed["final_model_step"]) == (stop, best)
    again = load_file(tmp_path / "final_model" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_records_beyond_the_models_context_are_refused(tmp_path, tiny_dir):
    """A model trained on 64 positions (the tiny model, its config.json saying so) and records of up to 162 tokens:
    refused before any weights load, naming data.max_length that fits; with it, the run goes on."""
    short = tmp_path / "short_context"
    short.mkdir()
    for f in Path(tiny_dir).iterdir():
        (short / f.name).symlink_to(f)
    (short / "config.json").unlink()
    config = json.loads((Path(tiny_dir) / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    with pytest.raises(UserError, match=r"The longest record is 162 tokens, but .* was trained on at most 64 "
                                        r"\(max_position_embeddings in its config.json\): set data.max_length=64"):
        run(tmp_path / "a", str(short), "preset=fast_test", "dry_run=true")
    run(tmp_path / "b", str(short), "preset=fast_test", "dry_run=true", "data.max_length=64")


def test_peft_args_shape_the_trained_adapter(tmp_path, tiny_dir):
    """lora.peft_args reach PEFT: LoRA on the first decoder layer only, with its own rank for q_proj."""
    run(tmp_path, tiny_dir, "preset=fast_test", "train.max_steps=1", "data.val_path=null",
        "+lora.peft_args.layers_to_transform=[0]", "+lora.peft_args.rank_pattern.q_proj=4")
    weights = load_file(tmp_path / "final_model" / "adapter_model.safetensors")
    assert weights and all(".layers.0." in k for k in weights), sorted(weights)
    assert {tuple(v.shape) for k, v in weights.items() if "q_proj.lora_A" in k} == {(4, 64)}
    assert {v.shape[0] for k, v in weights.items() if "k_proj.lora_A" in k} == {16}
    card = (tmp_path / "final_model" / "README.md").read_text()
    assert "{'layers_to_transform': [0], 'rank_pattern': {'q_proj': 4}}" in card
    # PEFT's refusals come before any weights load (the model's architecture alone), naming its linear layers
    with pytest.raises(UserError, match=r"PEFT cannot put LoRA on .* with lora.target_modules=.* and lora.peft_args "
                                        r"\{'layers_to_transform': \[99\]\}: Target modules .* not found"):
        run(tmp_path / "none", tiny_dir, "preset=fast_test", "train.max_steps=1", "data.val_path=null",
            "+lora.peft_args.layers_to_transform=[99]")
    # a name no layer has, also beside ones that match (which PEFT lets by: no LoRA there, silently)
    for targets, missing in (("[query,value]", "query, value"), ("[q_proj,k_proj,v_prj,o_proj]", "v_prj")):
        with pytest.raises(UserError, match=rf"lora.target_modules=\[.*\] names {missing}, which .* has no layer of: "
                                            r"LoRA would not go there. The model's linear layers: down_proj, gate_proj, "
                                            r"k_proj, o_proj, q_proj, up_proj, v_proj; its attention's: "
                                            r"lora.target_modules=\[k_proj,o_proj,q_proj,v_proj\] \(lora=all_linear"):
            run(tmp_path / "typo", tiny_dir, "preset=fast_test", "train.max_steps=1", "data.val_path=null",
                f"lora.target_modules={targets}")
        assert not (tmp_path / "typo").exists()
    # a model that names its attention's projections otherwise (Phi-3: qkv_proj, o_proj) is answered with those names
    from transformers import Phi3Config, Phi3ForCausalLM

    phi3 = tmp_path / "phi3"
    Phi3ForCausalLM(Phi3Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, pad_token_id=None)).save_pretrained(phi3)
    shutil.copy(Path(tiny_dir) / "tokenizer.json", phi3)
    shutil.copy(Path(tiny_dir) / "tokenizer_config.json", phi3)
    shutil.copy(Path(tiny_dir) / "chat_template.jinja", phi3)
    with pytest.raises(UserError, match=r"names q_proj, k_proj, v_proj, which .* has no layer of: LoRA would not go "
                                        r"there. The model's linear layers: down_proj, gate_up_proj, o_proj, qkv_proj; "
                                        r"its attention's: lora.target_modules=\[o_proj,qkv_proj\] \(lora=all_linear"):
        run(tmp_path / "phi3_run", str(phi3), "preset=fast_test", "train.max_steps=1", "data.val_path=null")
    run(tmp_path / "phi3_run", str(phi3), "preset=fast_test", "train.max_steps=1", "data.val_path=null",
        "lora.target_modules=[o_proj,qkv_proj]")
    assert {k.split(".")[-3] for k in load_file(tmp_path / "phi3_run" / "final_model" / "adapter_model.safetensors")} \
        == {"o_proj", "qkv_proj"}


def test_a_model_without_sdpa_attention_trains_with_eager(tmp_path, tiny_gemma2_dir, capsys):
    """The default model.attn_implementation=sdpa on Gemma 2, which transformers refuses to run with SDPA: the run
    says so and trains with eager attention (padding-free rows kept apart: tests/test_trainer.py)."""
    run(tmp_path / "plan", tiny_gemma2_dir, "preset=fast_test", "dry_run=true")
    assert "attention matrices" in capsys.readouterr().out  # the memory estimate counts what eager attention holds
    run(tmp_path, tiny_gemma2_dir, "preset=fast_test", "quantization=nf4", "train.max_steps=2")
    assert "Gemma2ForCausalLM has no SDPA attention in transformers, so it runs with eager attention" in \
        capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and math.isfinite(metrics["final_eval_loss"])
    assert (tmp_path / "final_model" / "adapter_model.safetensors").exists()


def test_experts_that_4bit_leaves_unquantized_are_named(tmp_path, tiny_dir, capsys):
    """Mixtral's experts are fused 3-D tensors in transformers, which bitsandbytes does not quantize: a 4-bit run
    says how much stays in bfloat16 (Mixtral-8x7B: 45.1 billion parameters, 84 GiB), and trains."""
    from transformers import MixtralConfig, MixtralForCausalLM

    mixtral = tmp_path / "mixtral"
    MixtralForCausalLM(MixtralConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)).save_pretrained(mixtral)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(tiny_dir) / name, mixtral)
    run(tmp_path / "run", str(mixtral), "preset=fast_test", "train.max_steps=1", "data.val_path=null")
    assert ("warning: quantization=nf4 quantizes linear layers: this model's experts, 24,576 of its 3,173,600 "
            "parameters held as fused tensors that bitsandbytes does not quantize, stay in bfloat16 (0.00 GiB; the dry "
            "run's memory estimate counts them so).") in capsys.readouterr().out
    assert (tmp_path / "run" / "final_model" / "adapter_model.safetensors").exists()
    run(tmp_path / "full", str(mixtral), "preset=fast_test", "train.max_steps=1", "data.val_path=null",
        "quantization=none", "dry_run=true")
    assert "quantizes linear layers" not in capsys.readouterr().out


def test_lora_stays_in_the_language_model_of_a_model_that_also_sees_images(tmp_path, tiny_gemma3_dir, capsys):
    """Gemma 3 (4B and up) loads as Gemma3ForConditionalGeneration, a vision tower beside its language model, and the
    tower's attention has q_proj, k_proj and v_proj too: PEFT would put LoRA there, parameters that text never trains.
    LoRA goes on the language model alone, in 4 bits, and the adapter loads with plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gemma3 = tiny_gemma3_dir
    said = "LoRA goes on the language model alone (model.vision_tower left out: text never runs through it)"
    run(tmp_path / "run", str(gemma3), "preset=fast_test", "train.max_steps=2", "data.val_path=null")
    assert said in capsys.readouterr().out
    saved = load_file(tmp_path / "run" / "final_model" / "adapter_model.safetensors")
    assert saved and all(".language_model." in k for k in saved)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gemma3), tmp_path / "run" / "final_model")
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.endswith("lora_A")} \
        == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not [n for n, _ in model.named_modules() if "vision" in n and "lora" in n]
    assert "on k_proj, o_proj, q_proj, v_proj (not in `(model\\.vision_tower)\\..*`)" in \
        (tmp_path / "run" / "final_model" / "README.md").read_text()  # (the model card)

    run(tmp_path / "plan", str(gemma3), "preset=fast_test", "lora=all_linear", "dry_run=true")
    # its language model's 2 x 7 linear layers, r=16 x (in + out): q and o 16 x 64, k and v 16 x 48 (one key-value
    # head of 16), gate, up and down 16 x 96; the vision tower's none
    assert "Trainable parameters: 16,384 of " in capsys.readouterr().out
    with pytest.raises(UserError, match=r"names out_proj, which .* has no layer of in its language model: LoRA would "
                                        r"not go there. The model's linear layers in its language model: down_proj, "):
        run(tmp_path / "vision", str(gemma3), "preset=fast_test", "lora.target_modules=[q_proj,out_proj]")


def test_a_model_saved_in_4bit_trains_with_the_settings_it_was_saved_with(tmp_path, tiny_dir):
    """A "-bnb-4bit" model loads with its own quantization settings whatever the run says (and not at all
    unquantized): a run that asks for others is refused, naming those that match; one that matches trains."""
    from sft_recipes import build, models

    saved = tmp_path / "bnb4"
    models.load_model(tiny_dir, "bfloat16", build.bnb_config(make().quantization)).save_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(tiny_dir) / name, saved)
    for asks, differ in (("quantization=none", "quantization=none: set quantization=nf4"),
                         ("quantization.double_quant=false", "quantization.double_quant=false: set "
                                                             "quantization.double_quant=true")):
        with pytest.raises(UserError, match=rf"^{saved} holds weights already quantized by bitsandbytes to 4 bits, which "
                                            r"load with the settings they were saved with: quantization=nf4 "
                                            r"quantization.quant_type=nf4 quantization.double_quant=true "
                                            rf"quantization.compute_dtype=bfloat16. This run asks for {differ}, or give "
                                            r"the model in full precision.$"):
            run(tmp_path / "refused", str(saved), "preset=fast_test", "train.max_steps=1", asks)
        assert not (tmp_path / "refused").exists()
    run(tmp_path / "run", str(saved), "preset=fast_test", "train.max_steps=2", "data.val_path=null")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and math.isfinite(metrics["final_train_loss"])
    # weights quantized otherwise: bitsandbytes cannot quantize them again
    gptq = tmp_path / "gptq"
    shutil.copytree(tiny_dir, gptq)
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq",
                                                                                     "bits": 4}}))
    with pytest.raises(UserError, match=rf"^{gptq} holds weights quantized with gptq, which bitsandbytes cannot "
                                        r"quantize again: train LoRA on them as transformers loads them with "
                                        r"quantization=none"):
        run(tmp_path / "refused", str(gptq), "preset=fast_test", "train.max_steps=1")


def test_training_continues_from_a_saved_adapter(tmp_path, tiny_dir, capsys):
    """model.adapter: a new run (on other data, say) starts from a saved adapter's weights and LoRA settings. With a
    learning rate of 1e-12 nothing moves, so its saved adapter equals the one it started from, key by key."""
    first = tmp_path / "first"
    run(first, tiny_dir, "preset=fast_test", "quantization=nf4", "lora=all_linear", "lora.r=8", "train.max_steps=4",
        "train.lr=2e-3", "data.val_path=null")
    start = load_file(first / "final_model" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in start.items() if "lora_B" in k)  # trained: B is no longer zero

    second = tmp_path / "second"
    run(second, tiny_dir, "preset=fast_test", "quantization=nf4", f"model.adapter={first}",  # the run: its final_model
        "train.max_steps=2", "train.lr=1e-12", "data.val_path=null")
    out = capsys.readouterr().out
    assert (f"Training further from the adapter {first / 'final_model'} (a fresh optimizer and schedule): its LoRA "
            "settings lora.r=8") in out
    config = json.loads((second / "final_model" / "adapter_config.json").read_text())
    assert config["r"] == 8 and any(m.endswith("gate_proj") for m in config["target_modules"])
    after = load_file(second / "final_model" / "adapter_model.safetensors")
    assert after.keys() == start.keys() and all(torch.allclose(after[k], start[k], atol=1e-9) for k in start)
    card = (second / "final_model" / "README.md").read_text()
    assert f"| started from | the adapter `{first / 'final_model'}` |" in card and "r=8" in card

    # resumed later, the run reads the adapter's weights from its own checkpoint: the first run may be gone
    shutil.rmtree(first)
    run(second, tiny_dir, "preset=fast_test", "quantization=nf4", f"model.adapter={first / 'final_model'}",
        "train.max_steps=3", "train.lr=1e-12", "data.val_path=null", "resume_from=auto")
    assert json.loads((second / "metrics.json").read_text())["global_step"] == 3
    again = load_file(second / "final_model" / "adapter_model.safetensors")
    assert all(torch.allclose(again[k], start[k], atol=1e-9) for k in start)


def test_an_adapter_for_another_model_is_refused(tmp_path, tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_recipes.errors import UserError

    other = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="does not fit this base model"):
        run(tmp_path / "run", tiny_dir, "preset=fast_test", "quantization=none", f"model.adapter={tmp_path / 'other'}",
            "train.max_steps=1", "data.val_path=null")
    with pytest.raises(UserError, match="no adapter_config.json there"):
        run(tmp_path / "run2", tiny_dir, "preset=fast_test", f"model.adapter={tmp_path}", "data.val_path=null")


def test_dora_and_rslora_train_and_load(tmp_path, tiny_dir):
    """lora.use_dora on 4-bit weights: it trains, saves its magnitude vectors and loads back with PEFT as the
    same model; lora.use_rslora scales by alpha/sqrt(r)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_recipes import build, models

    final = run(tmp_path, tiny_dir, "preset=fast_test", "quantization=nf4", "lora.use_dora=true", "lora.use_rslora=true",
                "lora.r=4", "train.max_steps=4", "train.lr=2e-3", "train.logging_steps=1", "data.val_path=null")
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["use_rslora"]
    assert any("lora_magnitude_vector" in k for k in load_file(final / "adapter_model.safetensors"))
    losses = loss_history(tmp_path)
    assert losses[4] < losses[1]
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, final)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha/sqrt(r) (alpha = 2 x 4), not 2
    assert models.adapter_lora(str(final))["use_dora"] and build.lora_config(make("lora.use_dora=true").lora).use_dora


def test_sample_answers_during_training_do_not_change_the_run(tmp_path, tiny_dir):
    """eval.samples=2 writes two answers per validation to samples.md; the loss curve is the one of the same run
    without them (generation must not touch the random state, the model's mode or the tokenizer). They take
    eval.repetition_penalty: one that rules out every token already in the conversation, the end-of-turn token
    included, leaves every answer cut at eval.max_new_tokens."""
    common = ["preset=fast_test", "quantization=nf4", "train.gradient_checkpointing=true", "train.max_steps=4",
              "train.save_steps=2", "train.logging_steps=1", "train.lr=2e-3", "eval.max_new_tokens=6"]
    run(tmp_path / "plain", tiny_dir, *common)
    run(tmp_path / "samples", tiny_dir, *common, "eval.samples=2", "eval.repetition_penalty=1e6")
    assert loss_history(tmp_path / "plain") == loss_history(tmp_path / "samples")
    text = (tmp_path / "samples" / "samples.md").read_text()
    first_val = json.loads(VAL.read_text())[0]
    assert [line.split(" (")[0] for line in text.splitlines() if line.startswith("## ")] == ["## step 2", "## step 4"]
    assert text.count("**Q:**") == 4 and f"**Q:** {first_val['question']}" in text
    assert text.count("- answer (cut at eval.max_new_tokens): ") == 4
    assert not (tmp_path / "plain" / "samples.md").exists()


def test_a_resumed_qlora_run_trains_as_the_uninterrupted_one(tmp_path, tiny_dir):
    """4-bit QLoRA keeps its adapter in bfloat16 (TRL, after the QLoRA paper), but Trainer's resume reloads it
    through peft, which upcasts it to float32: our Trainer puts the dtype back. The resumed run then has the
    uninterrupted run's losses and saves the same bfloat16 adapter."""
    common = ["preset=fast_test", "quantization=nf4", "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1",
              "train.lr=2e-3", "data.val_path=null", "train.save_total_limit=null"]
    run(tmp_path / "whole", tiny_dir, *common)
    cut = tmp_path / "cut"
    run(cut, tiny_dir, *common)
    shutil.rmtree(cut / "checkpoint-6")
    shutil.rmtree(cut / "final_model")
    (cut / "metrics.json").unlink()
    run(cut, tiny_dir, *common, "resume_from=auto")
    whole, resumed = loss_history(tmp_path / "whole"), loss_history(cut)
    assert all(abs(whole[s] - resumed[s]) < 1e-4 * whole[s] for s in (4, 5, 6)), (whole, resumed)
    a = load_file(tmp_path / "whole" / "final_model" / "adapter_model.safetensors")
    b = load_file(cut / "final_model" / "adapter_model.safetensors")
    assert {v.dtype for v in b.values()} == {v.dtype for v in a.values()} == {torch.bfloat16}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokens_per_second_leave_out_validation_and_saving(tmp_path, monkeypatch):
    """training_log.txt's tokens/s and metrics.json's count the time inside optimizer steps only."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sft_recipes import report

    clock = iter([0.0, 1.0, 1.0, 2.0, 12.0, 13.0])  # steps of 1 s; 10 s of validation between the 2nd and 3rd
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    log, state = report.TrainingLog(tmp_path / "log.txt"), TrainerState()
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    log.on_step_begin(args, state, control), log.on_step_end(args, state, control)
    state.global_step = 1
    log.on_log(args, state, control, logs={"loss": 3.0, "num_tokens": 100})
    for _ in range(2):
        log.on_step_begin(args, state, control), log.on_step_end(args, state, control)
    state.global_step = 3
    log.on_log(args, state, control, logs={"loss": 2.0, "num_tokens": 300})
    assert log.line.endswith(" tokens/s=100.0") and log.tokens_per_s == 100.0  # 200 tokens in 2 s of steps, not 12


def test_time_left_reads_as_a_clock():
    from sft_recipes.report import duration

    assert [duration(s) for s in (3.4, 59.6, 75, 3725)] == ["3 s", "1:00", "1:15", "1:02:05"]


def test_out_of_gpu_memory_names_what_shrinks_the_run_and_what_a_resume_takes(tmp_path, tiny_dir, monkeypatch):
    """torch's OutOfMemoryError in a training step (raised there: this machine has no GPU) ends in one paragraph: the
    overrides that shrink the run, which of them a resumed run takes, and what is kept; the resume it names trains
    on with that override. With no checkpoint yet, the run's own command starts it again."""
    from sft_recipes.trainer import Trainer

    step = Trainer.training_step
    fail_at = {"step": 2}

    def out_of_memory(self, *args, **kwargs):
        if self.state.global_step == fail_at["step"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", out_of_memory)
    overrides = ["preset=fast_test", "train.max_steps=4", "train.save_steps=2", "data.val_path=null"]
    with pytest.raises(UserError) as e:
        run(tmp_path / "a", tiny_dir, *overrides)
    assert str(e.value).startswith("Out of GPU memory. To fit, try: train.batch_size=1 train.grad_accum=2 (same "
                                   "samples per step); data.max_length=256")
    assert str(e.value).endswith(
        "train.gradient_checkpointing=true; preset=low_memory (of these, a resumed run takes "
        "train.gradient_checkpointing=true; the others change the run, so they start a new one). The last complete "
        f"checkpoint is {tmp_path / 'a' / 'checkpoint-2'}. Continue with: python -m sft_recipes resume_from=auto "
        f"hydra.run.dir={tmp_path / 'a'}")
    fail_at["step"] = 0
    with pytest.raises(UserError, match=r"; preset=low_memory\. Nothing of the run is kept \(no checkpoint yet\): "
                                        r"its command starts it again\.$"):
        run(tmp_path / "b", tiny_dir, *overrides)
    monkeypatch.undo()
    assert run(tmp_path / "a", tiny_dir, *overrides, "resume_from=auto", "train.gradient_checkpointing=true").is_dir()
    assert max(loss_history(tmp_path / "a")) == 4
