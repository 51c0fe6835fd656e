"""What a reader sees in the committed notebooks: clean cells and outputs that read well.

nbval executes the notebooks (``make notebooks``); these checks read the committed files only,
so they catch what execution cannot: a tool's directive left in a cell the learner reads, or
outputs that JupyterLab would show twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb")) + sorted(
    (REPO / "chapters").glob("*/*.ipynb")
)


def _code_cells(path: Path) -> list[dict]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [cell for cell in cells if cell["cell_type"] == "code"]


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_notebooks_are_found():
    assert len(NOTEBOOKS) > 18, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_no_tool_directives_in_cells(path: Path):
    # nbval reads cell tags (nbval-ignore-output, ...), so its comment form has no reason to be
    # in code a learner reads; neither has a formatter's `# fmt: skip`.
    directive = re.compile(r"#\s*(NBVAL_[A-Z_]+|fmt:\s*(skip|off|on))")
    found = [
        (index, line.strip())
        for index, cell in enumerate(_code_cells(path))
        for line in "".join(cell["source"]).splitlines()
        if directive.search(line)
    ]
    assert not found, f"{_name(path)}: use a cell tag (nbval-ignore-output) instead: {found}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_no_import_path_hacks(path: Path):
    # `bench` and `minifusion` are installed (pip install -e .), so a chapter imports them as any
    # reader's script would.
    hacks = [
        index
        for index, cell in enumerate(_code_cells(path))
        if re.search(r"sys\.path\.(insert|append)", "".join(cell["source"]))
    ]
    assert not hacks, f"{_name(path)}: cells {hacks} change sys.path"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_consecutive_stream_outputs_are_merged(path: Path):
    # Two stdout outputs in a row are one print stream split by the kernel's flushes; JupyterLab
    # merges them on screen but writes them back doubled when "Trust Notebook" saves the file.
    # `make execute` coalesces them (nbconvert --coalesce-streams).
    split = []
    for index, cell in enumerate(_code_cells(path)):
        outputs = cell.get("outputs", [])
        for first, second in zip(outputs, outputs[1:]):
            if first["output_type"] == second["output_type"] == "stream" and (
                first["name"] == second["name"]
            ):
                split.append(index)
                break
    assert not split, f"{_name(path)}: code cells {split} hold split stream outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_saved_widgets_fall_back_to_a_readable_line(path: Path):
    # An untrusted notebook (any fresh clone) shows a saved widget's text fallback; shown with
    # minifusion.utils.show_widget, that is one line saying how to bring it up.
    from minifusion.utils import WIDGET_NOTE

    bare = []
    for index, cell in enumerate(_code_cells(path)):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data:
                if "".join(data.get("text/plain", "")) != WIDGET_NOTE:
                    bare.append(index)
    assert not bare, f"{_name(path)}: code cells {bare} display a widget without show_widget"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_linked_files_exist(path: Path):
    # Images and notebooks a chapter links to (../assets/x.png, ../chapters/.../exercises.ipynb)
    # must be in the repository: a fresh clone shows a broken picture or a 404 otherwise.
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    targets = re.findall(r"\]\((\.\./[^)\s#]+)", text)
    missing = [t for t in targets if not (path.parent / t).resolve().exists()]
    assert not missing, f"{_name(path)} links to missing files: {missing}"
