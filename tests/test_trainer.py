"""The training step: our lean loss equals TRL's, and packed / padding-free batches keep samples apart."""
import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from conftest import TRAIN
from sft_recipes import build, data, prepare, templates, trainer as trainer_mod
from sft_recipes.errors import UserError
from test_config import make


@pytest.fixture(scope="module")
def rows(tokenizer):
    ds, _ = prepare.tokenize(data.load_records(TRAIN)[:6], tokenizer, templates.get("chat"), 512)
    return [ds[i] for i in range(6)]


def make_trainer(tiny_dir, tmp_path, cls, train_rows, sft_args=None, **kwargs):
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                     max_length=None, completion_only_loss=False, **(sft_args or {}))
    return cls(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
               peft_config=build.lora_config(make().lora), **kwargs)


def test_lean_loss_equals_trl_loss(tiny_dir, tmp_path, rows, monkeypatch):
    """Our two loss paths (lean; TRL's tiled LM head with the metrics kept on the device) against TRL's own
    compute_loss: the same loss and token accuracy; the metrics are read back only when logged."""
    ours = make_trainer(tiny_dir, tmp_path / "a", trainer_mod.Trainer, rows)
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:3])
    metrics = ours._metrics["train"]
    lean = ours.compute_loss(ours.model, dict(batch))
    monkeypatch.setattr(trainer_mod, "LEAN_LOGITS_BYTES", 0)  # force the tiled path
    monkeypatch.setattr(trainer_mod, "CPU_TILE_BYTES_PER_ELEMENT", 0)
    tiled = ours.compute_loss(ours.model, dict(batch))
    assert all(torch.is_tensor(v) for v in metrics["mean_token_accuracy"])  # not read back yet
    trl_loss = SFTTrainer.compute_loss(ours, ours.model, dict(batch))
    assert torch.allclose(lean, trl_loss, rtol=1e-5) and torch.allclose(tiled, trl_loss, rtol=1e-5), (lean, trl_loss)
    accuracy = [float(v) for v in metrics["mean_token_accuracy"]]
    assert accuracy[0] == accuracy[1] == accuracy[2] and metrics["num_tokens"] == [3 * int(batch["attention_mask"].sum())]
    ours.log({"loss": 1.0})
    assert ours.state.log_history[-1]["mean_token_accuracy"] == pytest.approx(accuracy[0])
    ours.args.loss_type = "dft"  # another TRL loss (train.sft_args.loss_type): TRL's own path
    assert not ours.plain_nll(batch)
    assert torch.allclose(ours.compute_loss(ours.model, dict(batch)), SFTTrainer.compute_loss(ours, ours.model,
                                                                                            dict(batch)))
    ours.args.loss_type = "nll"
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(ours.compute_loss(ours.model, dict(batch), num_items_in_batch=n), lean, rtol=1e-5)
    lean.backward()  # and it trains: LoRA weights get gradients
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in ours.model.named_parameters() if "lora_" in n_)


def test_on_a_cpu_the_lean_step_is_taken_while_it_holds_less_than_trls_tile(tiny_dir, tmp_path, rows, monkeypatch):
    """Without Triton, TRL's tiled kernel holds float32 temporaries of a whole tile (up to 4,096 positions by 32,768
    vocabulary entries, 31 bytes an element), more than the lean step's logits (16 bytes an element of 49,152): on
    a CPU the lean step is taken past LEAN_LOGITS_BYTES while its logits take no more than that tile (measured: 2.4
    GiB and 2.2 s against 3.1 GiB and 9.0 s on 3,236 positions, bench/loss_step.py). The memory estimate counts the
    same."""
    ours = make_trainer(tiny_dir, tmp_path / "a", trainer_mod.Trainer, rows)
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:3])
    tiled = []
    monkeypatch.setattr(ours, "tiled_loss", lambda *a, **kw: tiled.append(1) or trainer_mod.Trainer.tiled_loss(
        ours, *a, **kw))
    monkeypatch.setattr(trainer_mod, "LEAN_LOGITS_BYTES", 0)
    lean = ours.compute_loss(ours.model, dict(batch))
    assert tiled == []
    monkeypatch.setattr(trainer_mod, "CPU_TILE_BYTES_PER_ELEMENT", 0)
    assert torch.allclose(ours.compute_loss(ours.model, dict(batch)), lean, rtol=1e-5) and tiled == [1]
    monkeypatch.undo()

    assert trainer_mod.lean_limit(3236, 49152, cuda=False) == 3236 * 32768 * 31 > trainer_mod.LEAN_LOGITS_BYTES
    assert trainer_mod.lean_limit(3236, 49152, cuda=True) == trainer_mod.LEAN_LOGITS_BYTES
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_recipes import estimate

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4))
    logits = lambda tokens, cuda: estimate.estimate(  # noqa: E731
        model, 0, 4, "bfloat16", 1, tokens, True, cuda=cuda)["logits"]
    assert logits(3236, cuda=False) == 3236 * 49152 * 16  # lean, past LEAN_LOGITS_BYTES
    assert logits(3236, cuda=True) == 0  # TRL's Triton kernel (the GPU figures were measured with it)
    assert logits(8192, cuda=False) == 4096 * 32768 * 31  # a tile at once


def test_validation_loss_is_the_token_mean_whatever_the_batch(tiny_dir, tmp_path, rows, monkeypatch):
    """The validation loss is the mean over every trained token of the set (sft_recipes.evaluate's figure), and the
    token accuracy likewise, the same for any eval batch size and either loss path; Trainer's own mean of batch
    means is not."""
    from datasets import Dataset

    from sft_recipes.runs import mean_loss

    ours = make_trainer(tiny_dir, tmp_path, trainer_mod.Trainer, rows)
    ours.args.max_steps, ours.args.learning_rate, ours.args.save_strategy = 40, 1e-2, "no"
    ours.train()  # past the random start: some tokens guessed right, losses that differ from sample to sample
    ours.model.eval()
    val = Dataset.from_list(rows)
    per_token = mean_loss(ours.model, rows)
    correct = trained = 0
    with torch.no_grad():
        for row in rows:  # the token accuracy, over every trained token
            targets = torch.tensor(row["labels"][1:])
            guess = ours.model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].argmax(-1)
            correct, trained = correct + int((guess == targets).sum()), trained + int((targets != -100).sum())
    for batch in (1, 2, 4):
        ours.args.per_device_eval_batch_size = batch
        metrics = ours.evaluate(val)
        assert metrics["eval_loss"] == pytest.approx(per_token, rel=1e-5)
        assert metrics["eval_mean_token_accuracy"] == pytest.approx(correct / trained, rel=1e-6)
    monkeypatch.setattr(trainer_mod, "LEAN_LOGITS_BYTES", 0)  # the tiled path
    monkeypatch.setattr(trainer_mod, "CPU_TILE_BYTES_PER_ELEMENT", 0)
    assert ours.evaluate(val)["eval_loss"] == pytest.approx(per_token, rel=1e-5)
    ours.args.per_device_eval_batch_size = 1
    per_sample = sum(mean_loss(ours.model, [r]) for r in rows) / len(rows)
    ours.args.loss_type = "dft"  # TRL's own loss step (train.sft_args.loss_type): Trainer's figure stands
    dft = ours.evaluate(val)["eval_loss"]
    monkeypatch.setattr(trainer_mod.Trainer, "evaluation_loop", SFTTrainer.evaluation_loop)  # Trainer's own mean
    assert ours.evaluate(val)["eval_loss"] == pytest.approx(dft, rel=1e-6)
    ours.args.loss_type = "nll"
    assert ours.evaluate(val)["eval_loss"] == pytest.approx(per_sample, rel=1e-6)
    assert per_sample != pytest.approx(per_token, rel=1e-5)


def test_flop_count_is_trainers_counted_once(tiny_dir, tmp_path, rows):
    ours = make_trainer(tiny_dir, tmp_path, trainer_mod.Trainer, rows)
    for n in (2, 3):
        batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:n])
        assert ours.floating_point_ops(batch) == super(trainer_mod.Trainer, ours).floating_point_ops(batch) > 0


def test_warmup_learns_from_the_first_step(tiny_dir, tmp_path, rows):
    """transformers' warmup applies a learning rate of 0 at the first optimizer step; ours ramps (step + 1) /
    (warmup + 1), then follows the same cosine. The rates are those the optimizer applied, and the schedule's state
    saves and loads as a checkpoint needs."""
    from transformers import TrainerCallback

    applied = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            applied.append(optimizer.param_groups[0]["lr"])

    ours = make_trainer(tiny_dir, tmp_path, trainer_mod.Trainer, rows)
    ours.args.warmup_steps, ours.args.max_steps, ours.args.learning_rate = 2, 4, 1e-3
    ours.args.lr_scheduler_type = "cosine"
    ours.add_callback(Record())
    ours.train()
    assert applied == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.5e-3])
    state = ours.lr_scheduler.state_dict()
    torch.save(state, tmp_path / "scheduler.pt")
    assert torch.load(tmp_path / "scheduler.pt", weights_only=True)["last_epoch"] == 4
    plain = make_trainer(tiny_dir, tmp_path / "plain", SFTTrainer, rows)
    plain.args.warmup_steps, plain.args.max_steps, plain.args.lr_scheduler_type = 2, 4, "cosine"
    assert plain.create_scheduler(4, torch.optim.SGD(plain.model.parameters(), lr=1.0)).get_last_lr() == [0.0]


def test_loraplus_trains_the_b_matrices_at_the_ratio_times_the_rate(tiny_dir, tmp_path, rows):
    """train.loraplus_lr_ratio: PEFT's LoRA+ optimizer, scheduled as ours (warmup from the first step): every B
    matrix learns at ratio x the logged learning rate, every A matrix at it; each trainable parameter once."""
    from transformers import TrainerCallback

    applied = []  # per step: the logged rate, and each parameter's

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            applied.append((ours._get_learning_rate(), {id(p): g["lr"] for g in optimizer.param_groups
                                                        for p in g["params"]}))

    ours = make_trainer(tiny_dir, tmp_path, trainer_mod.Trainer, rows, loraplus_lr_ratio=16)
    ours.args.warmup_steps, ours.args.max_steps, ours.args.learning_rate = 2, 4, 1e-3
    ours.add_callback(Record())
    ours.train()
    names = {id(p): n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert [rate for rate, _ in applied] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.5e-3])
    for rate, rates in applied:
        assert rates.keys() == names.keys() and sum(len(g["params"]) for g in ours.optimizer.param_groups) == len(names)
        assert all(r == pytest.approx(rate * (16 if ".lora_B." in names[i] else 1)) for i, r in rates.items())
    assert {".lora_A." in n for n in names.values()} == {True, False}


def test_neftune_noise_is_scaled_to_each_sample_of_a_padding_free_row(tiny_dir, tmp_path, rows):
    """+train.sft_args.neftune_noise_alpha: the noise on each token's input embedding is uniform in +-alpha /
    sqrt(L x hidden size) with L its own sample's length, also where a row holds several samples (transformers' hook
    would take the row's length); applied once, and only in training."""
    import math

    ours = make_trainer(tiny_dir, tmp_path, trainer_mod.Trainer, rows, sft_args={"neftune_noise_alpha": 5.0})
    assert ours.neftune_noise_alpha is None  # transformers' own hook is not added when training starts
    embeddings, seen = ours.model.get_input_embeddings(), []
    embeddings.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows[:3])
    clean = embeddings.weight[batch["input_ids"]].detach()
    ours.model.train()
    ours.compute_loss(ours.model, dict(batch))
    noise, at = (seen[-1] - clean)[0], 0
    for row in rows[:3]:
        n = len(row["input_ids"])
        bound, biggest = 5.0 / math.sqrt(n * noise.size(-1)), noise[at:at + n].abs().max().item()
        assert 0.98 * bound < biggest <= bound * (1 + 1e-5), (n, biggest, bound)
        at += n
    ours.model.eval()
    ours.compute_loss(ours.model, dict(batch))
    assert torch.equal(seen[-1], clean)


BOTH_WAYS = pytest.mark.parametrize("way", ["traced", "around"])  # train.compile_checkpoint


@BOTH_WAYS
def test_compile_options_reach_torch_compile(tiny_dir, tmp_path, rows, way):
    ours = make_trainer(tiny_dir, tmp_path, trainer_mod.Trainer, rows)
    with pytest.raises(UserError, match="compile_options: Unexpected optimization option no_such_setting"):
        trainer_mod.compile_layers(ours.model, {"no_such_setting": True}, way)
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert trainer_mod.compile_layers(ours.model, {"coordinate_descent_tuning": True}, way) == 2  # tiny: 2 layers
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:2])
    ours.compute_loss(ours.model, dict(batch)).backward()
    # the layers still share one graph (equal options: the same backend for Dynamo's cache)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def compiled_checkpointed_model(tiny_dir, quantization, dropout, way):
    """The tiny model as train.compile sets it up: LoRA on q,k,v,o, gradient checkpointing, compiled layers."""
    from sft_recipes import models

    cfg = make(f"quantization={quantization}", f"lora.dropout={dropout}")
    dtype = "bfloat16" if quantization == "nf4" else "float32"
    model = get_peft_model(models.load_model(tiny_dir, dtype, build.bnb_config(cfg.quantization), "sdpa"),
                           build.lora_config(cfg.lora))
    torch._dynamo.reset()
    trainer_mod.compile_layers(model, None, way)
    model.gradient_checkpointing_enable()  # what Trainer calls (after the compile, at train()): non-reentrant
    model.enable_input_require_grads()
    model.train()
    return model


@BOTH_WAYS
def test_compiled_checkpointed_layers_recompute_the_layer(tiny_dir, rows, way):
    """Gradient checkpointing still recomputes each compiled layer in the backward, counted in 4-bit matmuls per
    step: 7 per layer in the forward, and 6 in the recompute when torch.compile traces through the checkpoint
    (the MLP's down projection, whose output no gradient needs, is left out), 7 when the checkpoint runs around
    the compiled forward. (Traced without our recompute policy, torch 2.11 recomputed none: 7 in all.)"""
    from torch.profiler import profile

    model = compiled_checkpointed_model(tiny_dir, "nf4", 0.0, way)
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:2])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model(**inputs, use_cache=False).loss.backward()  # compiles
    with profile() as prof:
        model(**inputs, use_cache=False).loss.backward()
    matmuls = sum(e.name == "bitsandbytes::gemm_4bit" for e in prof.events())
    assert matmuls == {"traced": 13, "around": 14}[way] * model.config.num_hidden_layers, matmuls

    # Activation offloading waits for the copy of the tensor saved max_fwd_stash_size saves back. Sized from the
    # saves of a training forward, that spans OFFLOAD_STASH_LAYERS layers, however many saves a layer makes (the
    # traced checkpoint's 22 a layer, 1 for the checkpoint around the layer), so the forward never waits on the
    # copy of its own layer's input (BENCHMARKS.md: 44 ms a step on an H200 with TRL's 5 and the traced layer)
    saves, starts = [], []
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    hooks = [layer.register_forward_pre_hook(lambda *_: starts.append(len(saves))) for layer in layers]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saves.append(t) or t, lambda t: t):
        loss = model(**inputs, use_cache=False).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    per_layer = starts[1] - starts[0]
    assert len(starts) == len(layers) and (per_layer > 5 if way == "traced" else per_layer == 1), starts
    stash = trainer_mod.offload_stash(len(saves), len(layers))
    assert stash >= trainer_mod.OFFLOAD_STASH_LAYERS * per_layer
    assert trainer_mod.offload_stash(30 * per_layer + 8, 30) == max(5, 3 * per_layer + 1)  # a 30-layer model


def test_offload_stash_attributes_are_trls():
    """Our Trainer reads OffloadActivations.tensor_id (saves so far in the step) and sets max_fwd_stash_size after
    each step; that runs only on a CUDA GPU, so here: TRL's class still counts and reads them under those names."""
    import inspect

    from trl.models.activation_offloading import OffloadActivations

    init = inspect.getsource(OffloadActivations.__init__)
    assert "self.tensor_id += 1" in init and "tensor_id - self.max_fwd_stash_size" in init
    assert "self.tensor_id = 0" in inspect.getsource(OffloadActivations.__enter__)  # counted per step


@BOTH_WAYS
def test_compiled_checkpointed_layers_replay_the_same_dropout(tiny_dir, rows, way):
    """With LoRA dropout, the recompute in the backward draws the same dropout masks as the forward:
    the gradient's norm matches a finite difference of the loss along it (float32: within 0.1 % here; with
    other masks the difference is about 40 %)."""
    model = compiled_checkpointed_model(tiny_dir, "none", 0.3, way)
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:2])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:
            if p.abs().sum() == 0:  # LoRA B starts at zero: give A a gradient too
                p.normal_(0, 0.02)

    def loss():  # grad enabled, so always the same compiled graph, seeded the same: the same masks
        torch.manual_seed(123)
        return model(**inputs, use_cache=False).loss

    loss().backward()  # compiles
    model.zero_grad()
    loss().backward()
    direction = [p.grad.clone() for p in lora]
    analytic = sum((g * g).sum() for g in direction).item()
    eps = 1e-3 / max(g.abs().max().item() for g in direction)

    def shifted(sign):
        with torch.no_grad():
            for p, g in zip(lora, direction):
                p.add_(sign * eps * g)
        value = loss().item()
        with torch.no_grad():
            for p, g in zip(lora, direction):
                p.sub_(sign * eps * g)
        return value

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(numeric - analytic) < 0.02 * analytic, (numeric, analytic)


@pytest.mark.parametrize("model_dir,attn", [("tiny_dir", "sdpa"), ("tiny_dir", "eager"),
                                            ("tiny_gemma2_dir", "eager"),  # (Gemma 2: a sliding window of 64)
                                            ("tiny_gemma3_dir", "sdpa")])  # (Gemma 3: one, beside a vision tower)
def test_padding_free_and_packed_batches_keep_samples_apart(request, model_dir, rows, attn):
    """Per-sample losses of samples laid end to end (as padding_free/packing do) equal those of each alone."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(model_dir), dtype=torch.float32,
                                                 attn_implementation=attn)
    model = get_peft_model(model, build.lora_config(make().lora)).eval()

    def per_token_losses(batch):
        out = model(**batch, use_cache=False)
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                                                 ignore_index=-100)[labels.flatten() != -100]

    with torch.no_grad():
        alone = torch.cat([per_token_losses(DataCollatorForLanguageModeling(pad_token_id=0)([r])) for r in rows])
        packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
        together = per_token_losses({k: packed[k] for k in ("input_ids", "position_ids", "labels")})
    assert together.shape == alone.shape
    assert torch.allclose(together, alone, atol=1e-4), (together - alone).abs().max()


def test_int8_layers_compute_validation_as_training_does_on_the_cpu(tiny_dir, rows, caplog):
    """bitsandbytes' 8-bit layers on the CPU train with de-quantized weights but would evaluate with int8 inputs
    (another result, 2-3x slower, a log line per layer per call): validation and inference take the training path."""
    from sft_recipes import models

    cfg = make("quantization=int8", "lora.dropout=0.0")
    model = get_peft_model(models.load_model(tiny_dir, "bfloat16", build.bnb_config(cfg.quantization), "sdpa"),
                           build.lora_config(cfg.lora))
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:2])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    losses = []
    with torch.no_grad(), caplog.at_level("WARNING"):
        for mode in ("train", "eval"):
            getattr(model, mode)()
            losses.append(model(**inputs).loss.item())
    assert losses[0] == losses[1]
    assert "MatMul8bitLt" not in caplog.text


def test_dora_on_int8_layers_trains_on_past_its_first_step(tiny_dir, rows):
    """DoRA de-quantizes each 8-bit weight at every forward and, on the CPU, puts it back without its scales, which
    bitsandbytes then took as the layer's own: the second step failed ('NoneType' object has no attribute
    'unsqueeze'). On a model from load_model every step runs, each on the same weights."""
    from sft_recipes import models

    cfg = make("quantization=int8", "lora.dropout=0.0", "lora.use_dora=true")
    model = get_peft_model(models.load_model(tiny_dir, "bfloat16", build.bnb_config(cfg.quantization), "sdpa"),
                           build.lora_config(cfg.lora))
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:2])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1] == losses[2] and torch.isfinite(torch.tensor(losses)).all()


def test_a_validation_leaves_4bit_training_gradients_as_they_were(tiny_dir, rows, recwarn):
    """bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit layer's weights for inference at its first eval-mode
    forward, for good; its kernel then has no backward ("silently incorrect" gradients). A model from load_model keeps
    its training form through validations, and generation (sample answers, evaluate, chat) repacks only while it runs:
    the gradients after either are the gradients before."""
    from bitsandbytes.functional import has_avx512bf16

    from sft_recipes import models

    cfg = make("quantization=nf4", "lora.dropout=0.0")
    model = get_peft_model(models.load_model(tiny_dir, "bfloat16", build.bnb_config(cfg.quantization), "sdpa"),
                           build.lora_config(cfg.lora))
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows[:2])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def grads():
        model.train()
        model.zero_grad()
        model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(**inputs)  # a validation
    after = grads()
    assert all(torch.equal(before[n], after[n]) for n in before)
    # sample answers (eval.samples) generate with the repacked kernel where there is one, then put the weights back
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    weight = layer.weight.data.clone()
    model.eval()
    with models.repacked_for_inference(model):
        model.generate(input_ids=inputs["input_ids"][:1, :8], max_new_tokens=3, do_sample=False)
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == has_avx512bf16()
    assert torch.equal(layer.weight.data.view(torch.uint8), weight.view(torch.uint8))  # (4-bit codes stored as bf16)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    again = grads()
    assert all(torch.equal(before[n], again[n]) for n in before)
    assert not [w for w in recwarn if "autograd kernel was not registered" in str(w.message)]
