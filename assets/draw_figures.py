"""Draw the course figures: ``architecture.png``, ``roadmap.png`` and ``chunked_scan.png``.

Run from the repository root (or anywhere — paths are relative to this file)::

    .venv/bin/python assets/draw_figures.py

The figures are plain matplotlib (boxes, arrows, text), so they can be redrawn and edited
without any drawing tool. Chapter 00 shows the first two (the README links to them), chapter 09
the third. Drawing code lives here rather than in the chapters, which show the pictures.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # draw to files; no window needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402
from PIL import Image  # noqa: E402  (Pillow comes with matplotlib)

HERE = Path(__file__).resolve().parent

# One colour per kind of component, used by both figures.
COLORS = {
    "norm": "#fff2b3",  # RMSNorm
    "mamba": "#cdeccd",  # Mamba branch (green)
    "attention": "#cfe2f7",  # attention branch (blue)
    "gate": "#ffd9b3",  # fusion gate (orange)
    "ffn": "#e3d4f2",  # SwiGLU / MoE (purple)
    "embed": "#f7d0dc",  # embeddings and LM head (pink)
    "io": "#eeeeee",  # tensors going in / out
    "panel": "#f8f9fb",
}
EDGE = "#3a3a3a"
ARROW = "#3a3a3a"
TAG = "#7a7a7a"  # the small "ch 04" labels


def box(ax, cx, cy, w, h, text, color, *, fontsize=11, weight="normal", tag=None, radius=0.8,
        lw=1.3, zorder=3):
    """A rounded box centred on (cx, cy); ``tag`` is a small grey label above its top edge."""
    patch = FancyBboxPatch(
        (cx - w / 2, cy - h / 2), w, h,
        boxstyle=f"round,pad=0,rounding_size={radius}",
        facecolor=color, edgecolor=EDGE, linewidth=lw, zorder=zorder,
    )
    ax.add_patch(patch)
    ax.text(cx, cy, text, ha="center", va="center", fontsize=fontsize, weight=weight,
            zorder=zorder + 1, linespacing=1.35)
    if tag:
        ax.text(cx + w / 2, cy + h / 2 + 0.35, tag, ha="right", va="bottom", fontsize=8.5,
                color=TAG, style="italic", zorder=zorder + 1)
    return patch


def arrow(ax, points, *, lw=1.6, color=ARROW, head=True, style="-|>", zorder=2):
    """A polyline through ``points``; the last segment carries the arrow head."""
    for (x0, y0), (x1, y1) in zip(points[:-2], points[1:-1]):
        ax.plot([x0, x1], [y0, y1], color=color, lw=lw, solid_capstyle="butt", zorder=zorder)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    ax.add_patch(FancyArrowPatch(
        (x0, y0), (x1, y1), arrowstyle=style if head else "-", mutation_scale=16,
        color=color, lw=lw, shrinkA=0, shrinkB=0, zorder=zorder,
    ))


def plus(ax, cx, cy, r=1.5):
    """The residual addition ⊕."""
    circle = plt.Circle((cx, cy), r, facecolor="white", edgecolor=EDGE, lw=1.5, zorder=4)
    ax.add_patch(circle)
    ax.plot([cx - r * 0.6, cx + r * 0.6], [cy, cy], color=EDGE, lw=1.5, zorder=5)
    ax.plot([cx, cx], [cy - r * 0.6, cy + r * 0.6], color=EDGE, lw=1.5, zorder=5)


def save_png(fig, path: Path) -> None:
    """Save ``fig`` as a compact PNG: flat-colour diagrams need no more than a 128-colour palette,
    which keeps the files (and the notebooks that embed them) about three times smaller."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor="white", bbox_inches="tight",
                pad_inches=0.15)
    plt.close(fig)
    image = Image.open(buffer).convert("RGB")
    image = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, format="PNG", optimize=True)


def shrink_to_fit(ax, text, max_width, min_size=7.0):
    """Reduce ``text``'s font size until it is at most ``max_width`` data units wide."""
    renderer = ax.figure.canvas.get_renderer()
    to_data = ax.transData.inverted()
    while text.get_fontsize() > min_size:
        bbox = text.get_window_extent(renderer)
        (x0, _), (x1, _) = to_data.transform([(bbox.x0, 0), (bbox.x1, 0)])
        if x1 - x0 <= max_width:
            break
        text.set_fontsize(text.get_fontsize() - 0.25)


def dot(ax, x, y):
    ax.plot([x], [y], "o", color=ARROW, ms=5, zorder=5)


# ---------------------------------------------------------------------------------------------
# architecture.png
# ---------------------------------------------------------------------------------------------


def draw_architecture(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(16.5, 9.2), dpi=100)
    ax.set_xlim(0, 180)
    ax.set_ylim(0, 100)
    ax.axis("off")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)  # the axes fill the whole figure
    fig.patch.set_facecolor("white")

    ax.text(90, 97.5, "MiniFusion: a decoder-only language model with parallel Mamba ∥ attention "
            "mixers", ha="center", va="center", fontsize=17, weight="bold")

    # --- left: the whole model, read bottom to top ------------------------------------------
    sx, bw = 17, 22
    box(ax, sx, 7, bw, 5, "token ids  (B, T)", COLORS["io"])
    box(ax, sx, 16.5, bw, 6, "embed_tokens\n(V × H lookup table)", COLORS["embed"], tag="ch 03")
    # the stack of layers, drawn as a pile of cards; data flows upwards, layer 1 first
    s0, s1 = 25, 59
    for k, off in enumerate((1.6, 0.8)):
        box(ax, sx + off, (s0 + s1) / 2 + off, bw, s1 - s0, "", "#f3f3f3" if k else "#e9e9e9",
            lw=1.0, zorder=1)
    box(ax, sx, (s0 + s1) / 2, bw, s1 - s0, "", "white", zorder=2)
    lw_ = bw - 6
    box(ax, sx, 30.5, lw_, 5, "layer 1", "#fbe9d6", fontsize=11)
    box(ax, sx, 42, lw_, 5, "layer i", COLORS["gate"], fontsize=11, weight="bold")
    box(ax, sx, 53.5, lw_, 5, "layer N", "#fbe9d6", fontsize=11)
    for y in (36.25, 47.75):
        ax.text(sx, y, "⋮", ha="center", va="center", fontsize=15, zorder=5)
    ax.text(sx - bw / 2 - 2.2, (s0 + s1) / 2, "N = num_hidden_layers", rotation=90, ha="center",
            va="center", fontsize=10, color="#333333")
    box(ax, sx, 66, bw, 5, "final RMSNorm", COLORS["norm"], tag="ch 04")
    box(ax, sx, 76, bw, 6, "lm_head\n(tied to embed_tokens)", COLORS["embed"], tag="ch 03")
    box(ax, sx, 86.5, bw, 5, "logits  (B, T, V)", COLORS["io"])
    for y0, y1 in ((9.5, 13.5), (19.5, s0), (s1, 63.5), (68.5, 73), (79, 84)):
        arrow(ax, [(sx, y0), (sx, y1)])
    ax.text(sx, 92.5, "the whole model (ch 11)", ha="center", fontsize=12, weight="bold")

    # --- right: one layer, zoomed ------------------------------------------------------------
    px0, px1, py0, py1 = 34, 179, 1.5, 92
    ax.add_patch(FancyBboxPatch((px0, py0), px1 - px0, py1 - py0,
                                boxstyle="round,pad=0,rounding_size=2", facecolor=COLORS["panel"],
                                edgecolor="#9aa3ad", lw=1.2, ls="--", zorder=0))
    # zoom lines from "layer i" to the panel
    ax.plot([sx + lw_ / 2, px0], [44.5, py1], color="#9aa3ad", lw=1.0, ls="--", zorder=0)
    ax.plot([sx + lw_ / 2, px0], [39.5, py0], color="#9aa3ad", lw=1.0, ls="--", zorder=0)
    ax.text((px0 + px1) / 2, 88.5, "one MiniFusion layer  (mixer_types[i] = \"hybrid\")",
            ha="center", va="center", fontsize=14, weight="bold")

    # the residual stream: a straight road from left to right
    ry = 80
    p1x, p2x = 145, 174
    ax.text(px0 + 1.5, ry + 1.8, "x  (B, T, H)", ha="left", va="bottom", fontsize=11.5)
    ax.text(px0 + 1.5, ry - 1.8, "residual stream", ha="left", va="top", fontsize=10,
            color="#555555", style="italic")
    arrow(ax, [(px0 + 1, ry), (p1x - 1.5, ry)], lw=2.4)
    plus(ax, p1x, ry)
    arrow(ax, [(p1x + 1.5, ry), (p2x - 1.5, ry)], lw=2.4)
    plus(ax, p2x, ry)
    arrow(ax, [(p2x + 1.5, ry), (px1 - 0.3, ry)], lw=2.4)
    ax.text(px1 - 0.5, ry + 2.2, "to the\nnext layer", ha="right", va="bottom", fontsize=9.5)

    # mixer sub-block: RMSNorm → {Mamba ∥ attention} → branch norms → gate → fuse → proj
    nx, gy = 47, 52  # input norm; the gate and the fusion sit on the same row
    dot(ax, nx, ry)
    arrow(ax, [(nx, ry), (nx, gy + 3.5)])
    box(ax, nx, gy, 14, 7, "RMSNorm\ninput_layernorm", COLORS["norm"], fontsize=10, tag="ch 04")
    my, ay = 66, 38  # rows of the two branches
    bx, bwid = 72, 25
    box(ax, bx, my, bwid, 10, "Mamba branch\nin_proj → conv1d →\nselective scan → out_proj",
        COLORS["mamba"], fontsize=10, tag="ch 09")
    box(ax, bx, ay, bwid, 10, "attention branch\nGQA + RoPE\nlocal + global heads",
        COLORS["attention"], fontsize=10, tag="ch 05–06")
    split = 57
    arrow(ax, [(nx + 7, gy), (split, gy)], head=False)
    dot(ax, split, gy)
    arrow(ax, [(split, gy), (split, my), (bx - bwid / 2, my)])
    arrow(ax, [(split, gy), (split, ay), (bx - bwid / 2, ay)])
    ax.text(split + 1, gy + 0.8, "same input\nto both", fontsize=8.5, color=TAG, style="italic",
            va="bottom")
    # branch norms
    bnx = 91
    box(ax, bnx, my, 9, 5, "RMSNorm", COLORS["norm"], fontsize=10)
    box(ax, bnx, ay, 9, 5, "RMSNorm", COLORS["norm"], fontsize=10)
    arrow(ax, [(bx + bwid / 2, my), (bnx - 4.5, my)])
    arrow(ax, [(bx + bwid / 2, ay), (bnx - 4.5, ay)])
    ax.text(bnx, ay - 4, "branch norms", ha="center", va="top", fontsize=8.5, color=TAG,
            style="italic")
    # m and a go to the fusion box; taps feed the gate
    gx, fx = 110, 129
    arrow(ax, [(bnx + 4.5, my), (fx, my), (fx, gy + 3)])
    arrow(ax, [(bnx + 4.5, ay), (fx, ay), (fx, gy - 3)])
    ax.text(bnx + 6, my + 0.8, "m", fontsize=14, style="italic", va="bottom")
    ax.text(bnx + 6, ay + 0.8, "a", fontsize=14, style="italic", va="bottom")
    tapx = 100
    dot(ax, tapx, my)
    dot(ax, tapx, ay)
    arrow(ax, [(tapx, my), (tapx, gy + 2.5), (gx - 9, gy + 2.5)])
    arrow(ax, [(tapx, ay), (tapx, gy - 2.5), (gx - 9, gy - 2.5)])
    box(ax, gx, gy, 18, 11,
        "gate g\n" + r"$\sigma(W_d \tanh(W_u[m;a]))$" + "\nper channel, rank r",
        COLORS["gate"], fontsize=10, tag="ch 10")
    arrow(ax, [(gx + 9, gy), (fx - 8, gy)])
    ax.text((gx + 9 + fx - 8) / 2, gy + 0.8, "g", fontsize=14, style="italic", ha="center",
            va="bottom")
    box(ax, fx, gy, 16, 6, r"$g\cdot m + (1-g)\cdot a$", COLORS["gate"], fontsize=12)
    # projection back to the residual stream
    box(ax, p1x, gy, 11, 6, "fusion_proj", COLORS["gate"], fontsize=10)
    arrow(ax, [(fx + 8, gy), (p1x - 5.5, gy)])
    arrow(ax, [(p1x, gy + 3), (p1x, ry - 1.5)])

    # FFN sub-block: RMSNorm → SwiGLU | MoE | none → ⊕
    ffx = 162
    dot(ax, ffx, ry)
    arrow(ax, [(ffx, ry), (ffx, 69.5)])
    box(ax, ffx, 66, 14, 7, "RMSNorm\n(post-attention)", COLORS["norm"], fontsize=10,
        tag="ch 04")
    box(ax, ffx, 48, 14, 13, "FFN\nSwiGLU (dense)\nor MoE\nor none", COLORS["ffn"],
        fontsize=10, tag="ch 07–08")
    arrow(ax, [(ffx, 62.5), (ffx, 54.5)])
    arrow(ax, [(ffx + 7, 48), (p2x, 48), (p2x, ry - 1.5)])

    # legend of the layer recipe
    notes = [
        ("mixer_types[i]", "\"hybrid\": both branches + gate (drawn)     \"mamba\": the Mamba "
         "branch only     \"attention\": the attention branch only"),
        ("ffn_types[i]", "\"dense\": SwiGLU     \"moe\": Mixture-of-Experts (router + experts)     "
         "\"none\": no FFN, as in pure Mamba models"),
        ("shapes", "B = batch, T = tokens, H = hidden_size, V = vocab_size;  "
         "inside a layer every arrow carries (B, T, H)"),
    ]
    for k, (key, text) in enumerate(notes):
        y = 22 - k * 6
        ax.text(px0 + 3, y, key, fontsize=11, weight="bold", va="center", family="monospace")
        ax.text(px0 + 21, y, text, fontsize=11, va="center")
    ax.text(px0 + 3, 5, "Small grey labels (ch NN) name the chapter that builds each part.",
            fontsize=10, color=TAG, style="italic", va="center")

    save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# roadmap.png
# ---------------------------------------------------------------------------------------------

PARTS = [
    ("Foundations", "#eeeeee", [
        ("00", "Welcome", "utils.py", "the map, devices,\nrepeatable runs"),
        ("01", "Config", "config.py", "every hyperparameter,\ncounting before building"),
        ("02", "Tokenizer", "tokenizer.py, corpus.py", "byte-level BPE\non Shakespeare"),
        ("03", "Embedding", "embedding.py, data.py", "embeddings, tied head,\nbatches of tokens"),
    ]),
    ("Building blocks", "#dcebf9", [
        ("04", "RMSNorm", "norm.py", "RMSNorm vs LayerNorm"),
        ("05", "RoPE", "rope.py", "rotary positions,\nlong contexts, XPos"),
        ("06", "Attention", "attention.py", "GQA, local + global\nheads, KV cache"),
        ("07", "SwiGLU", "mlp.py", "gated feed-forward,\nsizing and cost"),
        ("08", "MoE", "moe.py", "router, dispatch,\nload balancing"),
        ("09", "Mamba", "mamba.py, csrc/", "state space, a fast\nscan, the block"),
    ]),
    ("The model", "#ffe4c8", [
        ("10", "Fusion", "fusion.py", "hybrid designs, a gated\nlayer, honest gates"),
        ("11", "The model", "model.py, cache.py", "full LM, generation,\nblock variants"),
    ]),
    ("Training", "#d9f0d9", [
        ("12", "Training", "training.py", "AdamW, schedule,\nbf16, curves"),
        ("13", "Checkpointing", "checkpoint.py", "exact resume,\ncrash safety"),
        ("14", "Distributed", "distributed.py", "torchrun + DeepSpeed\nZeRO"),
    ]),
    ("Using it", "#eadcf5", [
        ("15", "Inference & pruning", "monitor.py, prune.py", "gate statistics, pruned\nexport, long context"),
        ("16", "Why hybrid?", "tasks.py, bench/", "recall, copying,\nequal budget and time"),
        ("17", "Fine-tuning", "finetune.py, instruct.py", "instructions, LoRA,\nevaluation"),
    ]),
]


def notebook_parts(chapter: str) -> str:
    """The letters of a chapter's parts, read from ``notebooks/`` ("abc" for 05a, 05b, 05c; ""
    for a chapter in one notebook)."""
    names = (HERE.parent / "notebooks").glob(f"{chapter}*.ipynb")
    return "".join(sorted(m[1] for n in names if (m := re.match(rf"{chapter}([a-z])_", n.name))))


def draw_roadmap(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(16, 10), dpi=100)
    ax.set_xlim(0, 160)
    ax.set_ylim(0, 100)
    ax.axis("off")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)  # the axes fill the whole figure
    fig.patch.set_facecolor("white")
    chapters = sum(len(row) for _, _, row in PARTS)
    sittings = sum(len(notebook_parts(num)) or 1 for _, _, row in PARTS for num, *_ in row)
    ax.text(80, 96.5, f"The MiniFusion course: {chapters} chapters in {sittings} sittings, one "
            "package", ha="center",
            va="center", fontsize=19, weight="bold")

    # one row per part, read left to right; the path turns down to the next row
    bw, bh, gap = 21.8, 13.0, 1.9
    x_first = 19.6
    pitch = 17.6
    previous = None  # (x, y) of the last box of the previous row
    for r, (part, color, chapters) in enumerate(PARTS):
        cy = 82.5 - r * pitch
        first, last = chapters[0][0], chapters[-1][0]
        box(ax, 9.0, cy, 16.4, bh, f"{part}\n\nchapters\n{first}–{last}", color, fontsize=11.5,
            weight="bold", radius=1.2)
        for k, (num, name, module, what) in enumerate(chapters):
            parts = notebook_parts(num)
            cx = x_first + bw / 2 + k * (bw + gap)
            box(ax, cx, cy, bw, bh, "", "white", lw=1.2, radius=1.0)
            left, top = cx - bw / 2, cy + bh / 2
            ax.add_patch(FancyBboxPatch((left + 1.0, top - 5.0), 5.0, 4.0,
                                        boxstyle="round,pad=0,rounding_size=0.8",
                                        facecolor=color, edgecolor=EDGE, lw=1.0, zorder=4))
            ax.text(left + 3.5, top - 3.0, num, ha="center", va="center", fontsize=12,
                    weight="bold", zorder=5)
            if parts:  # the chapter's parts, one sitting each (notebooks/NNa_…, NNb_…)
                ax.text(cx + bw / 2 - 1.0, cy - bh / 2 + 1.3, "parts " + " ".join(parts),
                        ha="right", va="center", fontsize=8.3, color="#666666", zorder=5)
            title = ax.text(left + 6.8, top - 3.0, name, ha="left", va="center", fontsize=11,
                            weight="bold", zorder=5)
            shrink_to_fit(ax, title, bw - 7.4)
            mod = ax.text(left + 1.2, top - 6.9, module, ha="left", va="center", fontsize=8.3,
                          color="#666666", family="monospace", zorder=5)
            shrink_to_fit(ax, mod, bw - 2.0)
            ax.text(left + 1.2, cy - 3.2, what, ha="left", va="center", fontsize=9.6, zorder=5,
                    linespacing=1.25)
            if k:
                arrow(ax, [(cx - bw / 2 - gap, cy), (cx - bw / 2, cy)], lw=1.5)
            elif previous is not None:
                # down from the previous row's last box, left along the gap, down into this one
                px, py = previous
                mid = (py - bh / 2 + cy + bh / 2) / 2
                arrow(ax, [(px, py - bh / 2), (px, mid), (cx, mid), (cx, cy + bh / 2)], lw=1.5)
        previous = (x_first + bw / 2 + (len(chapters) - 1) * (bw + gap), cy)

    ax.text(80, 1.2, "Each part (notebooks/NNa_topic.ipynb, NNb_…) is one sitting; a chapter builds "
            "its module of the package minifusion; exercises live in chapters/NN_topic/.",
            ha="center",
            fontsize=10.5, color="#555555")
    save_png(fig, path)


def draw_chunked_scan(path: Path, length: int = 12, chunk: int = 4) -> None:
    """Chapter 09's picture of the chunked scan: local scans from zero (all chunks at once), the
    short carry across chunks, and the correction that reaches every position."""
    colours = plt.cm.tab10.colors

    def xpos(t: int) -> float:  # positions, with a gap before every chunk
        return t + 1.6 * (t // chunk) + 1.2

    lanes = {"local": 2.0, "carry": 1.0, "fix": 0.0}
    fig, ax = plt.subplots(figsize=(10, 4.4))
    arrow = dict(arrowstyle="->", color="dimgrey", lw=0.8)
    for t in range(length):
        c = t // chunk
        for lane, alpha in (("local", 0.3), ("fix", 0.75)):
            ax.add_patch(
                plt.Rectangle(
                    (xpos(t) - 0.35, lanes[lane] - 0.22), 0.7, 0.44, color=colours[c], alpha=alpha
                )
            )
        ax.text(xpos(t), lanes["local"], f"{t}", ha="center", va="center", fontsize=8)
        ax.text(xpos(t), lanes["fix"], f"h{t}", ha="center", va="center", fontsize=8)
        if t % chunk:
            ax.annotate(
                "",
                (xpos(t) - 0.35, lanes["local"]),
                (xpos(t - 1) + 0.35, lanes["local"]),
                arrowprops=arrow,
            )
    num_chunks = math.ceil(length / chunk)
    for c in range(num_chunks):
        first, last = c * chunk, min((c + 1) * chunk, length) - 1
        start = xpos(first) - 0.95
        ax.text(start, lanes["local"], "0", ha="center", va="center", fontsize=9, color="dimgrey")
        ax.annotate(
            "",
            (xpos(first) - 0.35, lanes["local"]),
            (start + 0.15, lanes["local"]),
            arrowprops=arrow,
        )
        ax.scatter([start], [lanes["carry"]], s=520, color=colours[c], zorder=3)
        ax.text(
            start,
            lanes["carry"],
            f"in{c}",
            ha="center",
            va="center",
            fontsize=7,
            color="white",
            zorder=4,
        )
        for t in range(first, last + 1):  # 3. the entering state reaches every position
            ax.annotate(
                "",
                (xpos(t), lanes["fix"] + 0.22),
                (start, lanes["carry"] - 0.24),
                arrowprops=dict(arrowstyle="->", color=colours[c], lw=0.6, alpha=0.7),
            )
        if c + 1 < num_chunks:  # 2. carry: the decayed entering state + the local final state
            nxt = xpos((c + 1) * chunk) - 0.95
            ax.annotate(
                "",
                (nxt - 0.24, lanes["carry"]),
                (start + 0.24, lanes["carry"]),
                arrowprops=dict(arrowstyle="->", color="black", lw=1.2),
            )
            ax.text(
                (start + nxt) / 2,
                lanes["carry"] + 0.12,
                "× exp(A·ΣΔ of the chunk)",
                ha="center",
                fontsize=7,
            )
            ax.annotate(
                "",
                (nxt - 0.1, lanes["carry"] + 0.22),
                (xpos(last), lanes["local"] - 0.22),
                arrowprops=dict(arrowstyle="->", color="black", lw=1.0, ls="--"),
            )
    ax.set_yticks(
        [0, 1, 2],
        [
            "3. correct: local + in_c × exp(A·ΣΔ so far)\n(no sequential step)",
            "2. carry across chunks\n(L/chunk sequential steps)",
            "1. local scans from zero\n(chunk steps, all chunks at once)",
        ],
        fontsize=8,
    )
    ax.set_xticks([])
    ax.set_xlim(-0.4, xpos(length - 1) + 0.8)
    ax.set_ylim(-0.5, 2.5)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"The chunked scan: L = {length} positions in chunks of {chunk}")
    plt.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    draw_architecture(HERE / "architecture.png")
    draw_roadmap(HERE / "roadmap.png")
    draw_chunked_scan(HERE / "chunked_scan.png")
    print("wrote architecture.png, roadmap.png and chunked_scan.png in", HERE)
