"""A saved model that loads without MiniFusion: the modelling code travels with the weights.

``AutoModelForCausalLM.from_pretrained(folder)`` knows ``model_type: "minifusion"`` only in a
Python that has imported this package (``model.py`` registers it). Tools of the ecosystem —
lm-evaluation-harness, a plain transformers script, the Hugging Face Hub — never import it. The
Hub's answer for architectures transformers does not ship is *remote code*: the folder carries
its own ``configuration_*.py`` / ``modeling_*.py`` and ``config.json`` names them in
``auto_map``; ``from_pretrained(folder, trust_remote_code=True)`` then imports them from there.

:func:`write_remote_code` writes that code: the package's modules that the model needs, copied
with three rewrites —

* ``config.py`` becomes ``configuration_minifusion.py`` and ``model.py``
  ``modeling_minifusion.py`` (the Hub's naming), and every import of them follows;
* lines marked ``# hub: package only`` (registering the model with the ``Auto*`` classes of
  *this* Python) are left out — a remote model is found through ``auto_map`` instead;
* the fused scan's C++ source, which only ``.py`` files can carry (transformers copies nothing
  else), travels as a string in ``selective_scan_source.py`` and is written out to compile.

:func:`write_model_card` writes the folder's ``README.md``. ``MiniFusionForCausalLM
.save_pretrained`` calls both, so every saved model — a training run's export, a fine-tuned
model, a pruned one — is Hub-ready.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = [
    "AUTO_MAP",
    "CONFIGURATION_FILE",
    "MODELING_FILE",
    "remote_code_files",
    "write_model_card",
    "write_remote_code",
]

CONFIGURATION_FILE = "configuration_minifusion.py"
MODELING_FILE = "modeling_minifusion.py"
AUTO_MAP = {
    "AutoConfig": "configuration_minifusion.MiniFusionConfig",
    "AutoModel": "modeling_minifusion.MiniFusionModel",
    "AutoModelForCausalLM": "modeling_minifusion.MiniFusionForCausalLM",
}
SCAN_SOURCE_MODULE = "selective_scan_source"

_HERE = Path(__file__).resolve().parent
_RENAMED = {"config": CONFIGURATION_FILE[:-3], "model": MODELING_FILE[:-3]}
_PACKAGE_ONLY = "# hub: package only"
_EMBEDDED_SOURCE = "# hub: embedded source"
# extensions.py's lines marked "# hub: embedded source", as a saved model has them
_EMBEDDED_LINES = {
    "SCAN_SOURCE": [
        f"from .{SCAN_SOURCE_MODULE} import write_scan_source  # the C++ travels as text\n",
        "SCAN_SOURCE = write_scan_source()\n",
    ],
    "SCAN_EXTENSION": ['SCAN_EXTENSION = "minifusion_selective_scan_saved_model"\n'],
}
_RELATIVE_IMPORT = re.compile(r"^(\s*from\s+\.)(\w+)(\s+import\b)", flags=re.MULTILINE)


def _in_export() -> bool:
    """True when this file is itself a copy inside a saved model folder."""
    return (_HERE / MODELING_FILE).is_file()


def _module_file(name: str) -> Path:
    return _HERE / f"{_RENAMED.get(name, name) if _in_export() else name}.py"


def remote_code_files() -> list[str]:
    """The modules (package names, without ``.py``) the model imports, found by following the
    relative imports of ``model.py`` — the same rule transformers uses to collect them."""
    seen: list[str] = []
    todo = ["model"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        source = _module_file(name).read_text(encoding="utf-8")
        for match in _RELATIVE_IMPORT.finditer(source):
            imported = match.group(2)
            inverse = {v: k for k, v in _RENAMED.items()}
            todo.append(inverse.get(imported, imported))
    return sorted(seen)


def _rewrite(source: str) -> str:
    """The package's module text as it is saved next to the weights."""
    lines = []
    for line in source.splitlines(keepends=True):
        if line.rstrip().endswith(_PACKAGE_ONLY):
            continue
        if line.rstrip().endswith(_EMBEDDED_SOURCE):
            name = line.split("=")[0].strip()
            lines += _EMBEDDED_LINES[name]
            continue
        lines.append(line)
    text = "".join(lines)
    return _RELATIVE_IMPORT.sub(
        lambda m: f"{m.group(1)}{_RENAMED.get(m.group(2), m.group(2))}{m.group(3)}", text
    )


_SCAN_SOURCE_TEMPLATE = '''"""The fused selective scan's C++ source (MiniFusion chapter 09), carried as text.

A saved model's folder can only carry Python files to the place transformers imports them from,
so the kernel's source travels here and is written to the extension build folder to compile.
"""

import os
from pathlib import Path

SOURCE = r\'\'\'{source}\'\'\'


def write_scan_source() -> Path:
    """Write SOURCE where the extension builds (unchanged files are not rewritten)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    path = Path(root) / "minifusion_scan_source" / "selective_scan.cpp"
    if not path.is_file() or path.read_text(encoding="utf-8") != SOURCE:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{{os.getpid()}}")
        tmp.write_text(SOURCE, encoding="utf-8")
        os.replace(tmp, path)
    return path
'''


def write_remote_code(folder: str | Path) -> list[str]:
    """Write the modelling code into ``folder`` and name it in ``config.json``'s ``auto_map``.

    Call after ``save_pretrained`` wrote ``config.json``. Returns the file names written.
    Inside a saved model (this module imported as remote code) the files are copied as they are.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} is missing: write_remote_code adds code next to a saved model; "
            "call model.save_pretrained(folder) first."
        )
    written = []
    for name in remote_code_files():
        target = f"{_RENAMED.get(name, name)}.py"
        text = _module_file(name).read_text(encoding="utf-8")
        (folder / target).write_text(text if _in_export() else _rewrite(text), encoding="utf-8")
        written.append(target)
    if _in_export():
        scan_source = (_HERE / f"{SCAN_SOURCE_MODULE}.py").read_text(encoding="utf-8")
    else:
        cpp = (_HERE / "csrc" / "selective_scan.cpp").read_text(encoding="utf-8")
        if "'''" in cpp or cpp.endswith("\\"):
            raise ValueError("selective_scan.cpp cannot be carried in a raw ''' string")
        scan_source = _SCAN_SOURCE_TEMPLATE.format(source=cpp)
    (folder / f"{SCAN_SOURCE_MODULE}.py").write_text(scan_source, encoding="utf-8")
    written.append(f"{SCAN_SOURCE_MODULE}.py")

    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = dict(AUTO_MAP)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted(set(written))


def _layer_plan(config: Any) -> str:
    letters = {"attention": "A", "mamba": "M", "hybrid": "A∥M"}
    plan = []
    for mixer, ffn in zip(config.mixer_types, config.ffn_types):
        plan.append(letters.get(mixer, mixer) + ("" if ffn == "none" else f"+{ffn}"))
    return " → ".join(plan)


def write_model_card(
    folder: str | Path,
    config: Any,
    parameters: int,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/README.md``: what the model is, how it was trained, how to load it.

    ``training`` (optional) is a flat mapping of what the run knows — data, steps, tokens,
    validation bits per character — shown as a table.
    """
    folder = Path(folder)
    heads = f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads"
    window = (
        f"sliding window {config.sliding_window}, {config.num_global_heads} global heads"
        if getattr(config, "sliding_window", None)
        else "full causal attention"
    )
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [minifusion, mamba, hybrid, custom_code]",
        "---",
        "",
        "# A MiniFusion hybrid language model",
        "",
        "A hybrid of Mamba (selective state-space) layers and attention layers, built and trained "
        "with the MiniFusion course.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {parameters:,} |",
        f"| layers | {config.num_hidden_layers}: {_layer_plan(config)} |",
        f"| width | {config.hidden_size} |",
        f"| attention | {heads}, RoPE, {window} |",
        f"| Mamba | expansion {config.mamba_expand}, state size {config.mamba_d_state}, "
        f"convolution {config.mamba_d_conv} |",
        f"| vocabulary | {config.vocab_size} tokens |",
        f"| context trained on | see training below (positions up to "
        f"{config.max_position_embeddings}) |",
        "",
    ]
    if training:
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in training.items()]
        lines.append("")
    lines += [
        "## Loading it",
        "",
        "The modelling code is in this folder, so no MiniFusion install is needed:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", '
        "trust_remote_code=True)",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        "```",
        "",
        "`trust_remote_code=True` runs the Python files of this folder: read them first if the "
        "folder came from someone else. (The tokenizer is a plain one; transformers reads the "
        "model's config to pick it, hence the flag there too.) On CPU the Mamba layers compile a C++ scan on first use "
        "(about half a minute; a PyTorch scan is used where no compiler is found).",
        "",
        "Evaluate it with lm-evaluation-harness:",
        "",
        "```bash",
        "lm_eval --model hf --model_args pretrained=path/to/this/folder,trust_remote_code=True "
        "--tasks <task>",
        "```",
        "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
