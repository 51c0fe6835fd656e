"""A saved MiniFusion model loads with trust_remote_code=True where MiniFusion is not importable."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minifusion import hub
from minifusion.checkpoint import export_pretrained
from minifusion.config import MiniFusionConfig
from minifusion.model import MiniFusionForCausalLM

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter in which every import of minifusion fails, as in a Python that
# never installed it: transformers must find the model through config.json's auto_map alone.
_LOAD_WITHOUT_MINIFUSION = textwrap.dedent(
    """
    import json, sys
    import torch

    class NoMiniFusion:
        def find_spec(self, name, path=None, target=None):
            if name == "minifusion" or name.startswith("minifusion."):
                raise ImportError("minifusion is not importable in this test")

    sys.meta_path.insert(0, NoMiniFusion())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, again, inputs, output = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.load(inputs)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(again)  # a re-saved remote model must stay loadable the same way
    reloaded = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True).eval()
    with torch.no_grad():
        again_logits = reloaded(ids).logits
    torch.save({"logits": logits, "again": again_logits}, output)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    print(json.dumps({
        "module": type(model).__module__,
        "minifusion_modules": sorted(m for m in sys.modules if m.startswith("minifusion")),
        "tokens": tokenizer("To be").input_ids,
    }))
    """
)


def _small_model(seed: int = 0) -> MiniFusionForCausalLM:
    torch.manual_seed(seed)
    config = MiniFusionConfig.from_preset("tiny", vocab_size=400, max_position_embeddings=128)
    return MiniFusionForCausalLM(config).eval()


def test_saved_model_loads_and_computes_the_same_logits_without_minifusion(
    tmp_path, small_tokenizer
):
    model = _small_model()
    export_pretrained(model, small_tokenizer, tmp_path / "model")
    ids = torch.randint(0, 400, (2, 37), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits

    # The chunked PyTorch scan in the subprocess: compiling the saved model's own copy of the
    # C++ kernel would take half a minute (the package's kernel is checked against it elsewhere).
    env = {**os.environ, "MINIFUSION_FUSED_SCAN": "0", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_MINIFUSION, str(tmp_path / "model"),
         str(tmp_path / "again"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["minifusion_modules"] == []
    assert report["module"].startswith("transformers_modules.")
    assert report["tokens"] == small_tokenizer("To be").input_ids
    out = torch.load(tmp_path / "out.pt")
    # fused scan (here) against the chunked scan (there): equal up to float32 rounding
    torch.testing.assert_close(out["logits"], expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["again"], out["logits"], rtol=0, atol=0)
    assert (tmp_path / "again" / hub.MODELING_FILE).is_file()


def test_saved_folder_names_its_code_in_auto_map_and_carries_no_package_import(tmp_path):
    _small_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == hub.AUTO_MAP
    assert config["model_type"] == "minifusion"
    for module_path in tmp_path.glob("*.py"):
        tree = ast.parse(module_path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("minifusion"), module_path.name
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("minifusion") for a in node.names)
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # relative: must be there
                assert (tmp_path / f"{node.module}.py").is_file(), (module_path.name, node.module)
    modeling = (tmp_path / hub.MODELING_FILE).read_text()
    assert "AutoConfig.register" not in modeling  # found through auto_map, not registered
    assert not (tmp_path / "config.py").exists() and not (tmp_path / "model.py").exists()


def test_the_kernel_source_travels_unchanged(tmp_path):
    _small_model().save_pretrained(tmp_path)
    namespace: dict = {}
    exec((tmp_path / "selective_scan_source.py").read_text(), namespace)
    package_source = (REPO / "minifusion" / "csrc" / "selective_scan.cpp").read_text()
    assert namespace["SOURCE"] == package_source
    extensions = (tmp_path / "extensions.py").read_text()
    assert 'SCAN_EXTENSION = "minifusion_selective_scan_saved_model"' in extensions
    assert "write_scan_source()" in extensions


def test_model_card_describes_the_model_and_the_run(tmp_path, small_tokenizer):
    model = _small_model()
    facts = {"steps": "200", "validation bits per character": "2.5538"}
    export_pretrained(model, small_tokenizer, tmp_path / "model", training=facts)
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"| parameters | {model.num_parameters():,} |" in card
    assert "A → M → A → M" not in card  # every layer shows its FFN too
    assert "A+dense → M → A+dense → M" in card
    assert "| validation bits per character | 2.5538 |" in card
    assert "trust_remote_code=True" in card


def test_remote_code_needs_a_saved_config_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        hub.write_remote_code(tmp_path)
