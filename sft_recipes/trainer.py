"""TRL's SFTTrainer with a leaner loss step where the logits are small.

TRL computes the loss through a tiled log-probability kernel that also yields entropy and top-1 metrics, so
the (tokens x vocabulary) logits never exist at once; its backward recomputes every tile, which cost a
quarter of a training step on the CPU (bench/throughput.py, py-spy). When the logits of the trained positions
fit in LEAN_LOGITS_BYTES, the LM head here runs once, only at the positions that predict a trained token
(`logits_to_keep`), followed by one cross-entropy; larger batches (a 7B model's 100k vocabulary) keep TRL's
tiled kernel. The loss is the same sum over trained tokens divided by their count (tests/test_trainer.py
compares the two); the logged metrics are loss, token accuracy and num_tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import SFTTrainer


LEAN_LOGITS_BYTES = 2**30  # the most the lean step may hold in logits and their gradients at once
# bf16 logits, their float32 copy, the log-softmax, its gradient and the bf16 gradient: 2 + 4 + 4 + 4 + 2
LOGITS_BYTES_PER_ELEMENT = 16


class Trainer(SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        targets = labels[:, 1:]
        # sequence positions whose next token is trained, in any row of the batch
        keep = (targets != -100).any(0).nonzero().squeeze(-1)
        vocab = self.model.config.get_text_config().vocab_size
        if labels.size(0) * keep.numel() * vocab * LOGITS_BYTES_PER_ELEMENT > LEAN_LOGITS_BYTES:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
        targets = targets[:, keep]
        logits = outputs.logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        trained = targets != -100
        count = num_items_in_batch if num_items_in_batch is not None else trained.sum()
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        with torch.no_grad():
            correct = ((logits.argmax(-1) == targets) & trained).sum()
            n = self.accelerator.gather_for_metrics(trained.sum()).sum()
            correct = self.accelerator.gather_for_metrics(correct).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:  # padding-free: one row, real tokens only (padding, if any, is counted like TRL does)
                tokens = torch.tensor(inputs["position_ids"].size(1), device=labels.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        outputs.logits = None  # nothing downstream needs the partial logits
        return (loss, outputs) if return_outputs else loss
