"""TRL's SFTTrainer with a leaner loss step where the logits are small.

TRL computes the loss through a tiled log-probability kernel that also yields entropy and top-1 metrics, so
the (tokens x vocabulary) logits never exist at once; its backward recomputes every tile, which cost a
quarter of a training step on the CPU (bench/throughput.py, py-spy). When the logits of the trained positions
fit in LEAN_LOGITS_BYTES (on a CPU, in what TRL's kernel would hold there: lean_limit), the LM head here runs
once, only at the positions that predict a trained token (`logits_to_keep`), followed by one cross-entropy; larger
batches (a 7B model's 100k vocabulary) keep TRL's tiled kernel (on a GPU that is decided from the row width, since
counting the trained positions would make the host wait for the device), with the metrics left on the device until
they are logged. The loss is the same sum over trained tokens divided by their count (tests/test_trainer.py
compares the paths); the logged metrics are loss, token accuracy and num_tokens. Other losses TRL offers
(train.sft_args.loss_type, ...) take TRL's path.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTTrainer

from .errors import UserError
from .resume import COMPLETE



class NonFiniteError(RuntimeError):
    pass


def publish(tmp: Path, dest: Path, what: str) -> None:
    """Mark a fully written folder complete and rename it into place (atomic on one filesystem)."""
    (tmp / COMPLETE).write_text(what + "\n")
    if dest.exists():  # the same step saved again (e.g. at the end of training): replace it
        shutil.rmtree(dest)
    os.replace(tmp, dest)


# the signals that stop a run after the current step with a checkpoint: Ctrl-C, and SIGTERM (what a batch scheduler
# such as Slurm, or Kubernetes, sends before it kills a job); their names and the exit status of the stopped run
STOP_SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}


class Guard(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the current step, save a checkpoint, stop. Non-finite gradients: stop
    (train.on_nonfinite=stop) before the optimizer applies them, or drop that step's update (skip). A non-finite
    validation loss stops the run before the checkpoint of that step is written."""

    def __init__(self, on_nonfinite: str = "stop"):
        self.on_nonfinite, self.skipped = on_nonfinite, 0
        self.stopped_by: Optional[tuple] = None  # (name, exit status) of the signal that stops the run
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        def handler(signum, frame):
            name, code = STOP_SIGNALS[signum]
            if self.stopped_by:  # a second signal: stop now, without saving
                raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(code)
            self.stopped_by = (name, code)
            print(f"\n{name}: stopping after this step and saving a checkpoint ({name} again to quit at once).",
                  flush=True)

        try:
            self._previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def on_train_end(self, args, state, control, **kwargs):
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        # one max-norm over all gradients (foreach kernels) and one device sync: the largest |entry| is finite
        # exactly when every entry is (a 2-norm could overflow on large finite entries)
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"), foreach=True)):
            return
        if self.on_nonfinite == "skip":
            self.skipped += 1
            for p in model.parameters():
                p.grad = None  # the optimizer leaves parameters without a gradient untouched
            return
        raise NonFiniteError(f"the loss or its gradient became NaN or infinite at step {state.global_step + 1}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # evaluation runs before the checkpoint of the same step is saved: a non-finite validation loss stops
        # the run before weights that produce it are kept
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and not torch.isfinite(torch.tensor(loss)):
            raise NonFiniteError(f"the validation loss became {loss} at step {state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_initialized():
            # every process stops after the same step, whichever got the signal (a scheduler may signal only one)
            code = torch.tensor(self.stopped_by[1] if self.stopped_by else 0, device=args.device)
            torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
            code = code.item()  # (one device sync)
            if code and not self.stopped_by:
                self.stopped_by = next(v for v in STOP_SIGNALS.values() if v[1] == code)
        if self.stopped_by:
            control.should_save = True
            control.should_training_stop = True


LEAN_LOGITS_BYTES = 2**30  # the most the lean step may hold in logits and their gradients at once (on a GPU)
# bf16 logits, their float32 copy, the log-softmax, its gradient and the bf16 gradient: 2 + 4 + 4 + 4 + 2
LOGITS_BYTES_PER_ELEMENT = 16
# Where there is no Triton (the CPU), TRL's tiled kernel folds each tile of the logits (up to 4,096 positions by
# 32,768 vocabulary entries) in torch ops, with float32 temporaries: 31 bytes a tile element at once, measured (16 for
# the lean step's logits). There the lean step is taken while it holds no more than that tile: the embedded model's
# loss on 3,236 positions took 2.4 GiB and 2.2 s lean against 3.1 GiB and 9.0 s tiled (bench/loss_step.py).
CPU_TILE_BYTES_PER_ELEMENT = 31
TILE = (4096, 32768)  # (positions, vocabulary entries): TRL's TOKEN_CHUNK_SIZE and _CHUNKED_LOGPROB_CHUNK_SIZE


def lean_limit(positions: int, vocab: int, cuda: bool) -> int:
    """The most bytes the lean step's logits may take for a batch of `positions` positions: LEAN_LOGITS_BYTES, or
    on a CPU what TRL's tiled kernel would hold (tiled_bytes), where that is more."""
    return LEAN_LOGITS_BYTES if cuda else max(LEAN_LOGITS_BYTES, tiled_bytes(positions, vocab))


def tiled_bytes(positions: int, vocab: int) -> int:
    """What TRL's tiled kernel holds at once on a CPU: one tile of float32 temporaries."""
    return min(positions, TILE[0]) * min(vocab, TILE[1]) * CPU_TILE_BYTES_PER_ELEMENT


# How gradient checkpointing meets a compiled layer (train.compile_checkpoint). "traced": torch.compile traces
# through the layer's checkpoint and the backward recomputes only what it needs (not the MLP's down projection):
# 13 four-bit matmuls per layer and step. "around": the checkpoint runs eagerly around the compiled forward and
# the backward replays all of it: 14. "auto" is traced from torch 2.12, around before: on the GPU image's torch
# 2.11 the traced way is checked on the CPU only (BENCHMARKS.md: without the recompute policy below, torch 2.11
# recomputed nothing there, and offloading copied every activation, 0.8 s a step on an H200).
TORCH_2_12 = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")

# Activation offloading (train.activation_offloading, TRL's OffloadActivations) copies each saved activation to
# CPU memory on a side stream, and the forward waits for the copy of the tensor saved `max_fwd_stash_size` saves
# earlier before letting its GPU memory go. TRL's 5 saves are five layers where a layer saves only its input (an
# eager checkpoint), but the same layer where torch.compile traces the checkpoint (about 22 saves a QLoRA layer,
# parameters included): there the forward stalled on each layer's own copy, 30 waits of 1.3 ms a step on an H200
# (BENCHMARKS.md). So the stash spans OFFLOAD_STASH_LAYERS layers, counted from the saves of the step before; by
# then a copy is done, and no more than that many layer inputs stay on the GPU (estimate.OFFLOAD_STASH).
OFFLOAD_STASH_LAYERS = 3
TRL_OFFLOAD_STASH = 5


# Schedules whose warmup is transformers' ramp step / warmup_steps (train.scheduler); cosine_warmup_with_min_lr
# starts at 1 / warmup already.
LINEAR_WARMUP = {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup", "inverse_sqrt",
                 "cosine_with_min_lr"}


def scheduler_name(args) -> str:
    """args.lr_scheduler_type as train.scheduler names it (TrainingArguments may hold it as an enum)."""
    return str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))


def warmup_from_first_step(lr_lambda, warmup: int):
    """transformers' warmup gives the first optimizer step a learning rate of 0 (step / warmup at step 0), so
    that step moves no weight: with 21 steps and warmup_ratio 0.03 the one warmup step is lost. Here the ramp is
    (step + 1) / (warmup + 1): every warmup step learns, full rate after `warmup` steps; the rest is unchanged."""
    return lambda step: (step + 1) / (warmup + 1) if step < warmup else lr_lambda(step)


def offload_stash(saves: int, layers: int) -> int:
    """max_fwd_stash_size for OFFLOAD_STASH_LAYERS layers, from the saves of one training forward."""
    return max(TRL_OFFLOAD_STASH, math.ceil(OFFLOAD_STASH_LAYERS * saves / max(layers, 1)))


def recompute_all(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: recompute every op the backward needs, as a plain checkpoint does. Inside a
    traced checkpoint it makes torch 2.11 recompute autograd Functions too (bitsandbytes' 4-bit matmul is one),
    which it would otherwise save."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.PREFER_RECOMPUTE


def decoder_layers(model) -> list:
    """The model's decoder layers: the modules transformers checkpoints one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model, options: Optional[dict] = None, checkpoint: str = "auto") -> int:
    """torch.compile each decoder layer in place; returns how many.

    The layers share one compiled graph (same code, parameters passed in as inputs), so the compile happens
    once, on the first step. In place rather than `torch.compile(model)` (what TrainingArguments.torch_compile
    does): the module tree, the state-dict keys and each layer's gradient checkpointing stay as they are, and the
    code between the layers (embedding, attention masks, the loss) stays eager. `options` go to torch.compile
    (Inductor settings); `checkpoint` is traced, around or auto (above). Checked against eager on 4-bit QLoRA in
    tests/test_train.py."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    traced = checkpoint == "traced" or (checkpoint == "auto" and TORCH_2_12)
    recompute_policy = partial(create_selective_checkpoint_contexts, recompute_all)
    options = dict(options) if options else None
    layers = decoder_layers(model)
    compiled = {}  # one compiled forward per layer class: the layers share its graph
    for layer in layers:
        raw = getattr(type(layer).forward, "__wrapped__", None)  # the forward under transformers' checkpointing
        try:
            if raw is None:  # a layer of a model's own code (trust_remote_code): checkpointed, if at all, around it
                layer.compile(options=options)
            elif traced:
                layer.forward = checkpointed(layer, raw, context_fn=recompute_policy)
                layer.compile(options=options)
            else:
                if type(layer) not in compiled:
                    compiled[type(layer)] = torch.compile(raw, options=options)
                layer.forward = checkpointed(layer, compiled[type(layer)])
        except RuntimeError as e:  # "Unexpected optimization option X, known options are [...300 names]"
            if "optimization option" not in str(e):
                raise
            raise UserError(f"train.compile_options: {str(e).split(', known')[0]} (the keys are "
                            "torch._inductor.config settings, e.g. coordinate_descent_tuning).") from None
    return len(layers)


def checkpointed(layer, forward, **checkpoint_kwargs):
    """The layer's forward under its own checkpoint function (the one Trainer sets when it enables gradient
    checkpointing, with checkpoint_kwargs added), as transformers' wrapper does: no cache is read or written
    under the checkpoint (the recompute would write it twice)."""

    def checkpointed_forward(*args, **kwargs):
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            kwargs.update({k: None for k in CACHE_KWARGS if k in kwargs})
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            return layer._gradient_checkpointing_func(partial(forward, layer, **kwargs), *args, **checkpoint_kwargs)
        return forward(layer, *args, **kwargs)

    return checkpointed_forward


def neftune_noise(module, args, output):
    """NEFTune (train.sft_args.neftune_noise_alpha): uniform noise in +-alpha / sqrt(L x hidden size) on the input
    embeddings while training, with L the length of each token's own sample, read from the batch's position ids
    (module.sample_lengths): transformers' hook takes the row's length, so in padding-free or packed rows, which hold
    several samples, its noise would shrink with their number. Without position ids: the row's length, as there."""
    if not module.training:
        return output
    lengths = getattr(module, "sample_lengths", None)
    lengths = torch.full(output.shape[:2], output.size(1), device=output.device) if lengths is None else lengths
    scale = (module.neftune_noise_alpha / torch.sqrt(lengths.float() * output.size(-1))).to(output.dtype)
    return output + (torch.rand_like(output) * 2 - 1) * scale.unsqueeze(-1)


def sample_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """For each token of padding-free or packed rows (positions restart at 0 with each sample), its sample's length."""
    sample = (position_ids == 0).cumsum(-1) + position_ids.size(1) * torch.arange(
        position_ids.size(0), device=position_ids.device).unsqueeze(-1)  # a number per sample, over all rows
    return torch.bincount(sample.flatten())[sample]


class Trainer(SFTTrainer):
    """SFTTrainer + the lean loss step + checkpoints written to a staging folder and renamed into place + a warmup
    whose first step learns (+ each decoder layer compiled, with compile=True; + PEFT's LoRA+ optimizer, with
    loraplus_lr_ratio; + NEFTune's noise per sample, with neftune_noise_alpha)."""

    _staging = None
    _flops_per_token = None
    _layers = None  # decoder layers, counted once (activation offloading's stash)
    _eval_nll = None  # during an evaluation: see evaluation_loop
    _summed = 0  # batches whose loss went into _eval_nll

    def __init__(self, *args, compile: bool = False, compile_options: Optional[dict] = None,
                 compile_checkpoint: str = "auto", checkpoint_files: Optional[dict] = None,
                 loraplus_lr_ratio: Optional[float] = None, **kwargs):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        super().__init__(*args, **kwargs)
        self._embeddings = None  # with NEFTune: the input embeddings, whose noise ours is (neftune_noise)
        if self.neftune_noise_alpha is not None:
            self._embeddings = self.model.get_input_embeddings()
            self._embeddings.neftune_noise_alpha, self.neftune_noise_alpha = self.neftune_noise_alpha, None
            self._embeddings.register_forward_hook(neftune_noise)  # (None above: transformers adds no hook of its own)
        self.checkpoint_files = checkpoint_files or {}  # {name: text} written into each checkpoint (resume.py reads)
        if compile:
            n = compile_layers(self.model, compile_options, compile_checkpoint)
            if not n:
                raise UserError("train.compile=true found no decoder layers to compile in this model; "
                                "set train.compile=false.")
            print(f"train.compile: {n} decoder layers share one compiled graph (built during the first steps)",
                  flush=True)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.args.activation_offloading:  # the saves of this step's forward size the next steps' stash
            if self._layers is None:
                self._layers = len(decoder_layers(self.model))
            ctx = self.maybe_activation_offload_context
            ctx.max_fwd_stash_size = offload_stash(ctx.tensor_id, self._layers)
        return loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The validation loss as the mean over every trained token of the validation set, as
        sft_recipes.evaluate computes it, and the token accuracy likewise. Trainer averages each batch's mean instead,
        weighting the samples by the batches they fell in: its figure changes with the batch size, so runs of a sweep
        over train.batch_size would not compare. Over several processes, see without_repeats."""
        # loss sum, trained tokens, correct next-token guesses, batches not summed (TRL's own loss step took them)
        self._eval_nll = torch.zeros(4, device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            loss_sum, tokens, correct, not_summed = self.accelerator.reduce(self._eval_nll, "sum").tolist()
            if not not_summed and tokens and f"{metric_key_prefix}_loss" in output.metrics:
                output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / tokens
                self._metrics["eval"]["mean_token_accuracy"] = [correct / tokens]  # what TRL's log() averages
        finally:
            self._eval_nll = None
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._eval_nll is not None and self.plain_nll(inputs):
            inputs = self.without_repeats(inputs)
        before = self._summed
        output = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if self._eval_nll is not None and self._summed == before:  # the loss came from TRL's own step: Trainer's
            self._eval_nll[3] += 1  # figure stands (decided over all processes: each takes part in the sum)
        return output

    def without_repeats(self, inputs):
        """The last validation batch over several processes: where the validation set does not split evenly, accelerate
        fills each process's last batch with the set's first samples again (its gather_for_metrics drops them from what
        it gathers). Their labels are masked here, so that every sample counts once in the summed loss. The samples
        are rows, or in a padding-free row the runs that start at position 0; a packed row holds several samples
        whose row boundaries are gone, so packed validation (train.packing) still counts the repeats."""
        state, world = self.accelerator.gradient_state, self.accelerator.num_processes
        packed = self.args.eval_packing if self.args.eval_packing is not None else self.args.packing
        if world == 1 or packed or not state.in_dataloader or not state.end_of_dataloader or state.remainder <= 0:
            return inputs
        per_process = state.active_dataloader.total_batch_size // world
        real = min(per_process, max(0, state.remainder - self.accelerator.process_index * per_process))
        if real == per_process:
            return inputs
        labels = inputs["labels"].clone()
        if "position_ids" in inputs and labels.size(0) == 1:  # padding-free: samples one after another
            starts = (inputs["position_ids"][0] == 0).nonzero().squeeze(-1)
            labels[:, starts[real] if real < starts.numel() else labels.size(1):] = -100
        else:
            labels[real:] = -100
        return {**inputs, "labels": labels}

    def create_optimizer(self, model=None):
        """With LoRA+, PEFT's optimizer: the B matrices at train.lr x train.loraplus_lr_ratio, the A matrices at
        train.lr (the learning rate logged); the scheduler scales both alike."""
        if self.optimizer is None and self.loraplus_lr_ratio:
            from peft.optimizers import create_loraplus_optimizer

            model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = create_loraplus_optimizer(model, cls, loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                       loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        made = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        if (made and warmup > 0 and type(scheduler) is torch.optim.lr_scheduler.LambdaLR
                and scheduler_name(self.args) in LINEAR_WARMUP):
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                scheduler.optimizer, [warmup_from_first_step(f, warmup) for f in scheduler.lr_lambdas])
        return self.lr_scheduler

    def _get_output_dir(self, trial):
        return self._staging or super()._get_output_dir(trial)

    def create_model_card(self, *args, **kwargs):
        """TRL writes a draft card into the run dir at every save (naming the base `None` for a local folder);
        the run's card is sft_recipes.card's, in final_model/."""

    @contextmanager
    def _same_dtypes(self):
        """Trainer reloads a PEFT adapter (on resume, and for the best checkpoint at the end) with peft's
        load_adapter, which upcasts it to float32, while TRL keeps a QLoRA adapter in bfloat16 (as the QLoRA paper
        does). Each trainable parameter goes back to the dtype it had: a resumed run computes as the uninterrupted
        one, and final_model/ is saved in the dtype that trained."""
        dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
        yield
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is not None:  # FSDP and DeepSpeed load after wrapping: left as they are
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        with self._same_dtypes():
            super()._load_from_checkpoint(resume_from_checkpoint)

    def _load_best_model(self):
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # sharded parameters: left as they are
            return super()._load_best_model()
        with self._same_dtypes():
            super()._load_best_model()

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._staging = str(run_dir / ".staging")
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        # every process writes its own RNG state into the folder: the main one renames it into place only after all
        # have (without this, another process's write could find the folder gone: a crash in 1 of ~10 CPU launches)
        self.accelerator.wait_for_everyone()
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == run_dir / ".staging":  # Trainer found the best one where it was written
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            if self.args.should_save:  # what a resumed run reads: where the best checkpoint will be
                self.state.save_to_json(str(run_dir / ".staging" / name / "trainer_state.json"))
        if self.args.should_save:
            from transformers.trainer_utils import rotate_checkpoints

            for file, text in self.checkpoint_files.items():
                (run_dir / ".staging" / name / file).write_text(text)
            publish(run_dir / ".staging" / name, run_dir / name, f"step {self.state.global_step}")
            # by step (Trainer's mtime order warns about "this filesystem" when checkpoints come within a second)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate for `total_flos` (6 x tokens x parameters), with the parameters counted once: Trainer
        counts them at every step, walking every module (several ms of host time per step, the GPU waiting)."""
        if self._flops_per_token is None:
            self._flops_per_token = super().floating_point_ops({"input_ids": torch.zeros(1, 1)})
        ids = inputs.get("input_ids")
        return self._flops_per_token * ids.numel() if ids is not None else 0

    def plain_nll(self, inputs) -> bool:
        """Whether this loss is the plain mean negative log-likelihood of the trained tokens, what the two paths
        below compute. Anything else TRL offers (train.sft_args: loss_type, label_smoothing_factor, a custom loss;
        an MoE router loss; sequence-parallel pre-shifted labels) takes TRL's own compute_loss."""
        sp = getattr(self.accelerator, "parallelism_config", None)
        return (self.args.loss_type == "nll" and self.compute_loss_func is None and self.label_smoother is None
                and not self.aux_loss_enabled and "shift_labels" not in inputs and not getattr(sp, "sp_enabled", False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._embeddings is not None:  # NEFTune: each token's noise scaled to its own sample
            positions = inputs.get("position_ids")
            self._embeddings.sample_lengths = None if positions is None else sample_lengths(positions)
        if not self.plain_nll(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        targets = labels[:, 1:]
        vocab = self.model.config.get_text_config().vocab_size
        limit = lean_limit(targets.numel(), vocab, labels.is_cuda)  # (the tiled kernel scores every position there)
        fits = lambda positions: labels.size(0) * positions * vocab * LOGITS_BYTES_PER_ELEMENT <= limit
        keep = None
        if not labels.is_cuda or fits(targets.size(1)):  # on a GPU, counting the trained positions would stall it
            keep = (targets != -100).any(0).nonzero().squeeze(-1)  # positions whose next token is trained, any row
        if keep is None or not fits(keep.numel()):
            if return_outputs:  # the logits are wanted (compute_metrics): TRL's path builds them
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return self.tiled_loss(model, inputs, num_items_in_batch)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
        targets = targets[:, keep]
        logits = outputs.logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        trained = targets != -100
        with torch.no_grad():
            correct = ((logits.argmax(-1) == targets) & trained).sum()
        loss = self.finish(mode, inputs, loss, trained.sum(), correct, num_items_in_batch)
        outputs.logits = None  # nothing downstream needs the partial logits
        return (loss, outputs) if return_outputs else loss

    def tiled_loss(self, model, inputs, num_items_in_batch=None):
        """TRL's tiled LM head and loss (the logits never exist whole), with the metrics kept on the device until
        they are logged: TRL's compute_loss reads three of them back at every step, each time making the host
        wait for the forward before it may queue the backward."""
        mode = "train" if self.model.training else "eval"
        outputs = model(**{**inputs, "use_cache": False}, fused_lm_head=True)
        return self.finish(mode, inputs, -outputs.log_probs.sum(), outputs.label_mask.sum(), outputs.is_top1.sum(),
                           num_items_in_batch)

    def finish(self, mode, inputs, loss_sum, trained, correct, num_items_in_batch):
        """The loss from its sum over the trained tokens (divided by their count, or by Trainer's count over the
        accumulated batches), and the metrics TRL logs: token accuracy as a device tensor, num_tokens."""
        if mode == "eval" and self._eval_nll is not None:
            self._eval_nll[:3] += torch.stack([loss_sum.detach(), trained, correct]).float().to(self._eval_nll)
            self._summed += 1
        count = num_items_in_batch if num_items_in_batch is not None else trained
        loss = loss_sum / torch.as_tensor(count, device=loss_sum.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():
            n = self.accelerator.gather_for_metrics(trained.detach()).sum()
            correct = self.accelerator.gather_for_metrics(correct).sum()
            self._metrics[mode]["mean_token_accuracy"].append(correct / n.clamp(min=1))  # read back by log()
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            else:  # padding-free: rows of real tokens only (padding, if any, is counted like TRL does)
                tokens = inputs["position_ids"].size(1)
                if self.accelerator.num_processes > 1:
                    width = torch.tensor(tokens, device=inputs["position_ids"].device)
                    tokens = self.accelerator.gather_for_metrics(width).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def log(self, logs, start_time=None):
        """TRL's log, after reading back the metrics the loss step kept on the device (one sync per log)."""
        for store in self._metrics.values():
            for key, values in store.items():
                if kept := [v.float() for v in values if torch.is_tensor(v)]:
                    read = iter(torch.stack(kept).tolist())
                    store[key] = [next(read) if torch.is_tensor(v) else v for v in values]
        super().log(logs, start_time)
