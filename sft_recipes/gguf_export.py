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
# llama.cpp's k-quants (a mix of types chosen per tensor), made from an f16 export by its llama-quantize
K_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
EMBEDDINGS = ("token_embd.weight", "output.weight")
# tensors that llama.cpp's converter computes from the config (Llama 3.1's rope scaling): copied from the source
CONSTANTS = ("rope_freqs.weight",)


def file_name(qtype: str) -> str:
    return f"model.{K_QUANTS[qtype] if qtype in K_QUANTS else TYPES[qtype][0]}.gguf"


def llama_quantize() -> Optional[str]:
    """llama.cpp's llama-quantize: in $LLAMA_CPP_BIN, on the PATH, or built by tools/llama_cpp.sh."""
    import shutil

    from .models import cache_root

    if os.environ.get("LLAMA_CPP_BIN"):
        path = Path(os.environ["LLAMA_CPP_BIN"]) / "llama-quantize"
        return str(path) if path.exists() else None
    built = sorted(cache_root().glob("llama.cpp-*/build/bin/llama-quantize"))
    return shutil.which("llama-quantize") or (str(built[-1]) if built else None)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout of the q and k rows (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(model, n_blocks: int) -> dict:
    """GGUF name -> (state_dict key, heads whose rows llama.cpp permutes, or None) for a llama-architecture
    transformers model. The arrays are made one at a time while writing: a 7B model is never held twice."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    out = {}
    for key in model.state_dict():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the tied head is the embedding
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: the merged model's tensor {key} has no llama.cpp name.")
        heads = (cfg.num_attention_heads if ".attn_q." in name else
                 cfg.num_key_value_heads if ".attn_k." in name else None)
        out[name] = (key, heads)
    return out


def check(source: Optional[Path], qtype: str, base: str = "the base model"):
    """The source file's reader, once the type and the architecture are known to be ones written here."""
    import gguf

    if qtype not in TYPES and qtype not in K_QUANTS:
        raise UserError(f"gguf={qtype}: use one of {', '.join([*TYPES, *K_QUANTS])}.")
    if qtype in K_QUANTS and llama_quantize() is None:
        raise UserError(f"gguf={qtype} is made by llama.cpp's llama-quantize, which is not on the PATH (or in "
                        "$LLAMA_CPP_BIN): build it once with `bash tools/llama_cpp.sh` (a few minutes), or use "
                        "gguf=q8_0.")
    if source is None:
        raise UserError(f"gguf={qtype} takes the tokenizer and settings from the GGUF file the base model came as, "
                        f"and this run's base ({base}) did not come as one (or that file is gone). Merge without "
                        "gguf= and run llama.cpp's convert_hf_to_gguf.py on RUN/merged.")
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise UserError(f"GGUF export: {source.name} is a '{arch}' model; only llama-architecture models are "
                        "written here. Run llama.cpp's convert_hf_to_gguf.py on the merged/ folder instead.")
    return reader


def write(model, chat_template: str, source: Path, dest: Path, qtype: str = "q8_0", reader=None) -> Path:
    """Write `model` (a merged, plain transformers model) to dest in the GGUF type `qtype`, taking every
    setting but the weights and the chat template from the base's GGUF file `source` (`reader`: check()'s
    reader of it, if already made; reading the file takes a second or two)."""
    import gguf
    import torch

    reader = reader or check(source, qtype)
    if qtype in K_QUANTS:
        return _k_quant(model, chat_template, source, dest, qtype, reader)
    arch = "llama"
    n_blocks = reader.fields[f"{arch}.block_count"].contents()
    tensors = gguf_names(model, n_blocks)
    state = model.state_dict()
    expected = [t.name for t in reader.tensors]
    constants = {t.name: t for t in reader.tensors if t.name in CONSTANTS}
    if set(tensors) | set(constants) != set(expected):
        diff = sorted((set(tensors) | set(constants)) ^ set(expected))
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
            if name in constants:
                c = constants[name]
                w.add_tensor(name, c.data, raw_dtype=c.tensor_type)
                continue
            hf_key, heads = tensors[name]
            a = state[hf_key].detach().to(torch.float32).cpu().numpy()
            if heads:
                a = _permute(a, heads)
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


def _k_quant(model, chat_template: str, source: Path, dest: Path, qtype: str, reader) -> Path:
    import subprocess

    f16 = write(model, chat_template, source, dest.with_name(f".{dest.name}.f16-{os.getpid()}"), "f16", reader)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        r = subprocess.run([llama_quantize(), str(f16), str(tmp), K_QUANTS[qtype]], capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"llama-quantize {K_QUANTS[qtype]} failed (exit {r.returncode}): {r.stderr[-1500:]}")
        os.replace(tmp, dest)
    finally:
        for path in (f16, tmp):
            if os.path.exists(path):
                os.unlink(path)
    return dest
