"""Write a merged model as one GGUF file (llama.cpp, Ollama, LM Studio), for a base model that came as GGUF.

The base's own GGUF file supplies everything but the weights: the architecture settings and the tokenizer as
llama.cpp reads it (vocabulary, merges, pre-tokenizer, special tokens). The chat template is the run's (from
final_model/'s tokenizer). Tensors get the names and layout of llama.cpp's converter (the rows of q and k
permuted for its rotary embedding); one-dimensional tensors (norms) stay float32 as there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError

# name: (tensor type, file type); the 4-bit types keep the embedding in 8 bits, as llama.cpp's quantizer does
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
EMBEDDINGS = ("token_embd.weight", "output.weight")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout of the q and k rows (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, n_blocks: int) -> dict:
    """GGUF name -> float32 array for a llama-architecture transformers model."""
    import gguf
    import torch

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    out = {}
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the tied head is the embedding
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: the merged model's tensor {hf} has no llama.cpp name.")
        a = t.detach().to(torch.float32).cpu().numpy()
        if ".attn_q." in name:
            a = _permute(a, cfg.num_attention_heads)
        elif ".attn_k." in name:
            a = _permute(a, cfg.num_key_value_heads)
        out[name] = a
    return out


def check(source: Optional[Path], qtype: str, base: str = "the base model"):
    """The source file's reader, once the type and the architecture are known to be ones written here."""
    import gguf

    if qtype not in TYPES:
        raise UserError(f"gguf={qtype}: use one of {', '.join(TYPES)}.")
    if source is None:
        raise UserError(f"gguf={qtype} takes the tokenizer and settings from the GGUF file the base model came as, "
                        f"and this run's base ({base}) did not come as one. Merge without gguf= and run llama.cpp's "
                        "convert_hf_to_gguf.py on RUN/merged.")
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise UserError(f"GGUF export: {source.name} is a '{arch}' model; only llama-architecture models are "
                        "written here. Run llama.cpp's convert_hf_to_gguf.py on the merged/ folder instead.")
    return reader


def write(model, chat_template: str, source: Path, dest: Path, qtype: str = "q8_0") -> Path:
    """Write `model` (a merged, plain transformers model) to dest in the GGUF type `qtype`, taking every
    setting but the weights and the chat template from the base's GGUF file `source`."""
    import gguf

    reader = check(source, qtype)
    arch = "llama"
    n_blocks = reader.fields[f"{arch}.block_count"].contents()
    tensors = gguf_tensors(model, n_blocks)
    expected = [t.name for t in reader.tensors]
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))
        raise UserError(f"GGUF export: the merged model's tensors differ from {source.name}'s: {diff[:5]}.")

    tensor_type, file_type = (getattr(gguf.GGMLQuantizationType, TYPES[qtype][0]),
                              getattr(gguf.LlamaFileType, TYPES[qtype][1]))
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")  # renamed into place once complete
    try:
        w = gguf.GGUFWriter(tmp, arch)  # writes general.architecture
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                                   "tokenizer.chat_template"):
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
        w.add_file_type(file_type)
        w.add_chat_template(chat_template)
        block = gguf.GGML_QUANT_SIZES
        for name in expected:  # the source's order
            a = tensors[name]
            t = tensor_type
            if a.ndim == 1:
                t = gguf.GGMLQuantizationType.F32
            elif name in EMBEDDINGS and qtype.startswith("q4"):
                t = gguf.GGMLQuantizationType.Q8_0
            if a.shape[-1] % block[t][0]:
                t = gguf.GGMLQuantizationType.F16  # rows that do not split into blocks (llama.cpp does the same)
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
