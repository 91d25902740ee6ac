"""One figure style for every kvtheory plot, sized for a paper column, saved as PNG and PDF.

Figures are always drawn from saved results by a function; nothing is edited by hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .io import atomic_write

__all__ = ["COLUMN_WIDTH", "FULL_WIDTH", "COLORS", "style", "family", "family_label", "series",
           "series_label", "tick", "new_figure", "save_figure",
           "figure_context", "per_model", "model_stamp"]

#: width of one column of a two-column paper, inches
COLUMN_WIDTH = 3.4
#: width of a full page, inches
FULL_WIDTH = 7.0

#: colour per method family, used in every figure (colour-blind safe, Okabe-Ito)
COLORS = {
    "fp": "#000000",
    "quant": "#0072B2",
    "kivi": "#56B4E9",
    "rank": "#D55E00",
    "hybrid": "#009E73",
    "theory": "#CC79A7",
    "other": "#999999",
}

_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "figure.dpi": 150,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}


@contextmanager
def style() -> Iterator[None]:
    """Apply the kvtheory style inside a ``with`` block (matplotlib's rc_context)."""
    import matplotlib

    if not os.environ.get("DISPLAY"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context(_RC):
        yield


def _method(spec):
    """The parsed method of ``spec``, or None when it names none (e.g. an unregistered family)."""
    from .errors import KVTheoryError
    from .methods import parse_method

    try:
        return parse_method(spec)
    except KVTheoryError:
        return None


def family(spec: str) -> str:
    """Method family of a spec, for its colour (the spec's own ``plot_family``): fp, quant,
    kivi, rank, hybrid, a registered family's, or ``other`` for a string that names no method.

    >>> family("int4-kivi"), family("rank16x4-pca"), family("int4-hadamard"), family("zz")
    ('kivi', 'hybrid', 'quant', 'other')
    """
    m = _method(spec)
    return "other" if m is None else m.plot_family


def family_label(fam: str) -> str:
    """The legend name of a colour family (the first registered family drawn in it).

    >>> family_label("quant"), family_label("rank")
    ('INT per token', 'rank (PCA)')
    """
    from .methods import FAMILIES

    return next((f.legend for f in FAMILIES.values() if f.plot_family == fam), fam)


def series(spec: str, fam: str | None = None) -> tuple[str, str]:
    """(colour family, line) of a spec in a figure with one line per family (hybrids: one
    line per coefficient bit width); ``fam`` for a spec that names no method.

    >>> series("rank32x8-pca"), series("int4")
    (('hybrid', 'x8'), ('quant', 'quant'))
    """
    m = _method(spec)
    return (fam or "other",) * 2 if m is None else m.series


def series_label(spec: str, fam: str | None = None) -> str:
    """The legend label of a spec's line, e.g. ``INT-b per token``, ``rank r + INT8 coefficients``."""
    m = _method(spec)
    return (fam or spec) if m is None else m.label


def tick(spec: str) -> str:
    """A short tick label: ``int4-kivi`` -> ``int4\\nKIVI``, ``rank16-pca`` -> ``rank16``.

    >>> tick("int4-kivi"), tick("rank32x8-pca"), tick("rank16-pca")
    ('int4\\nKIVI', 'rank32\\n×INT8', 'rank16')
    """
    m = _method(spec)
    return spec if m is None else m.tick


def new_figure(width: float = COLUMN_WIDTH, aspect: float = 0.75, nrows: int = 1, ncols: int = 1,
               **kwargs):
    """A figure of the given width (inches) and height ``width*aspect``."""
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, width * aspect), **kwargs)


#: the open :func:`figure_context` blocks (innermost last): (file-name tag, stamp text)
_CONTEXT: list[tuple[str | None, str | None]] = []


@contextmanager
def figure_context(tag: str | None = None, stamp: str | None = None) -> Iterator[None]:
    """Inside the block, :func:`save_figure` names files ``<name>-<tag>`` and writes ``stamp``
    (the model, its weights and the config drawn: what a reader needs to know where a figure
    came from) in small type at the figure's foot.

    >>> with figure_context("smollm2-135m", "smollm2-135m"):
    ...     _CONTEXT[-1]
    ('smollm2-135m', 'smollm2-135m')
    """
    _CONTEXT.append((tag, stamp))
    try:
        yield
    finally:
        _CONTEXT.pop()


def per_model(plot_one, results: dict, out_dir, stamp=None) -> list[Path]:
    """Draw ``plot_one(result, out_dir)`` once per model of ``results`` (``{model: result}``),
    each figure file tagged with the model and stamped with ``stamp(model, result)`` (default:
    the model name)."""
    paths: list[Path] = []
    for model, result in results.items():
        text = stamp(model, result) if stamp is not None else model
        with figure_context(_slug(model), text):
            paths += list(plot_one(result, out_dir))
    return paths


def model_stamp(model: str, what: str = "") -> str:
    """The stamp of a figure drawn from ``model``'s results: its name, where its weights came
    from (:func:`weights_note`, e.g. a dequantized 4-bit GGUF) and ``what`` was
    measured."""
    note = weights_note(model)
    return " · ".join(x for x in (model + (f" ({note})" if note else ""), what) if x)


def weights_note(model: str) -> str:
    """What a registry model's weights are (its registry description up to the architecture
    note, e.g. ``SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32``); empty for other
    names and paths (their weights are whatever the user loaded).

    >>> weights_note("smollm2-135m")
    'SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32'
    >>> weights_note("/my/model")
    ''
    """
    from ._packaged import PACKAGED

    entry = next((e for e in PACKAGED if e.name == model), None)
    return "" if entry is None else entry.description.split(" (")[0]


def _slug(model: str) -> str:
    from .stages import model_slug

    return model_slug(model)


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> list[Path]:
    """Save ``fig`` as ``name.png`` and ``name.pdf`` in ``out_dir``, atomically; close it.
    Inside :func:`figure_context` the name gets ``-<tag>`` and the figure its stamp."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    tag, stamp = _CONTEXT[-1] if _CONTEXT else (None, None)
    if tag:
        name = f"{name}-{tag}"
    if stamp:
        fig.text(0.99, 0.003, stamp, ha="right", va="bottom", fontsize=4.5, color="#666666")
    paths = []
    for ext in ("png", "pdf"):
        target = out_dir / f"{name}.{ext}"
        # no creation date: the same results redraw byte-identical files
        meta = {"CreationDate": None} if ext == "pdf" else {}
        atomic_write(target, lambda tmp, ext=ext, meta=meta: fig.savefig(tmp, format=ext, metadata=meta),
                     arg="figures dir")
        paths.append(target)
    plt.close(fig)
    return paths
