"""`import-gguf`: tiny GGUF files written with gguf's GGUFWriter (F32, F16, Q8_0, Q4_0 tensors) are imported
and checked against transformers' own GGUF loading of the same file; every bad input is one line, no leftovers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from blockmerge.cli import main
from blockmerge.io.gguf import find_packaged_gguf, import_gguf
from blockmerge.suite.synth import write_tiny_gguf
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Every tensor type the test covers in one file: norms F32 (as llama.cpp writes them), embeddings F16,
# attention Q8_0, MLP Q4_0, an untied head Q8_0.
MIXED = {"token_embd": "F16", "attn": "Q8_0", "ffn": "Q4_0", "output.": "Q8_0", "default": "F32"}


@pytest.fixture(scope="module", params=[("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2-untied"])
def tiny(request, tmp_path_factory) -> Path:
    arch, tied = request.param
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / f"{arch}.gguf", arch, MIXED, tied=tied)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out |= {k: sf.get_tensor(k) for k in sf.keys()}
    return out


def test_fp32_import_matches_transformers_gguf_loading(tiny, tmp_path):
    """Logits, tokenizer and tied head as transformers' from_pretrained(gguf_file=) gives them."""
    out = import_gguf(tiny, tmp_path / "out", dtype="float32", progress=False)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny.name, dtype=torch.float32)
    assert type(ours) is type(ref)
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-6, atol=1e-6)
    written = tensors(out)
    assert all(t.dtype == torch.float32 for t in written.values())
    tied = ref.config.tie_word_embeddings
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in written) is (not tied)
    assert tied is all(t.name != "output.weight" for t in gguf.GGUFReader(tiny).tensors)
    text = "the cat in the hat<|im_end|>"
    tok, ref_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny.parent, gguf_file=tiny.name)
    assert tok(text).input_ids == ref_tok(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cli_writes_requested_dtype_in_shards(tiny, tmp_path, dtype):
    """The fp32 import rounded to `dtype`, tensor for tensor, in several shards with an index."""
    ref = tensors(import_gguf(tiny, tmp_path / "fp32", dtype="float32", progress=False))
    out = tmp_path / "half"
    name = str(dtype).removeprefix("torch.")
    assert main(["import-gguf", str(tiny), str(out), "--dtype", name, "--shard-size", "20KB", "--no-progress"]) == 0
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    got = tensors(out)
    assert got.keys() == ref.keys()
    for k, t in got.items():
        assert t.dtype == dtype and torch.equal(t, ref[k].to(dtype)), k
    assert AutoModelForCausalLM.from_pretrained(out).dtype == dtype


def _not_gguf(d: Path) -> Path:
    (d / "model.gguf").write_bytes(b"PK\x03\x04 this is a zip archive, not a model")
    return d / "model.gguf"


def _truncated(d: Path) -> Path:
    data = write_tiny_gguf(d / "full.gguf", "llama", {"default": "F16"}).read_bytes()
    (d / "full.gguf").unlink()
    (d / "model.gguf").write_bytes(data[: len(data) - 1000])
    return d / "model.gguf"


def _unknown_arch(d: Path) -> Path:
    w = gguf.GGUFWriter(str(d / "model.gguf"), "notamodel")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return d / "model.gguf"


def _q8_1(d: Path) -> Path:
    """Q8_1 (llama.cpp's activation type) is one the gguf package cannot dequantise."""
    write_tiny_gguf(d / "model.gguf", "llama", {"ffn_up": "Q8_1"})
    return d / "model.gguf"


@pytest.mark.parametrize(
    "make, message",
    [
        (_not_gguf, "not a GGUF file"),
        (_truncated, "truncated"),
        (_unknown_arch, "architecture 'notamodel' is not supported by transformers' GGUF loader"),
        (_q8_1, "tensor blk.0.ffn_up.weight has quantisation type Q8_1, which the gguf package cannot dequantise"),
    ],
    ids=["not-gguf", "truncated", "unknown-arch", "q8_1"],
)
def test_bad_gguf_is_one_line_and_leaves_nothing(make, message, tmp_path, capsys):
    src = make(tmp_path)
    before = set(tmp_path.iterdir())
    assert main(["import-gguf", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"blockmerge import-gguf: error: {src}: ") and message in err
    assert set(tmp_path.iterdir()) == before  # no OUT, no .out.tmp-PID


def test_existing_output_needs_force(tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "m.gguf", "llama", {"default": "Q8_0"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["import-gguf", str(src), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists (use --force to overwrite)" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 2
    assert main(["import-gguf", str(src), str(out), "--force", "--no-progress"]) == 0
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert main(["import-gguf", str(src), str(tmp_path), "--force", "--no-progress"]) == 2  # OUT holds the input
    assert "would replace the input GGUF file" in capsys.readouterr().err and src.exists()


def test_find_packaged_gguf_does_not_import_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_llm_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package needs llm')\n")
    (pkg / "models" / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_packaged_gguf("fake_llm_pkg") == pkg / "models" / "tiny.gguf"
    with pytest.raises(FileNotFoundError, match="package no_such_pkg_xyz: not installed"):
        find_packaged_gguf("no_such_pkg_xyz")
