"""Token heatmaps: text coloured by relevance, as standalone HTML (coloured spans and a legend) or as a PNG.

Tokens are the strings of any tokenizer. Sub-word conventions are recognised (``subwords="auto"``):

* WordPiece (BERT): ``"##ing"`` continues the previous word;
* byte-level BPE (GPT-2, RoBERTa, Llama 3): ``"Ġ"`` marks a leading space, ``"Ċ"`` a newline, and other
  byte characters are decoded (``"Ã©"`` -> ``"é"``);
* SentencePiece (T5, Llama 2): ``"▁"`` marks a leading space;
* plain words (joined with spaces), or ``"raw"`` strings that carry their own spaces (e.g. decoded pieces
  ``" the"``).

Every token stays one coloured box (its own relevance), sub-words of one word are drawn without a gap;
tokens that are only whitespace are shown as ``␣`` / ``↵`` so that their relevance stays visible.
:func:`merge_subwords` sums sub-word relevance into words instead.
"""
from __future__ import annotations

import codecs
import html
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .image import (DEFAULT_PERCENTILE, Colormap, _colorbar_spec, _colorize, _font, _line_height, _scale,
                    _text_width, _wrap, colorbar, get_colormap, save_png)

__all__ = ["SUBWORD_STYLES", "detect_subwords", "display_tokens", "merge_subwords", "token_html",
           "save_token_html", "token_image", "save_token_png"]

#: Sub-word conventions understood by the token-heatmap functions (``"auto"`` picks one).
SUBWORD_STYLES = ("wordpiece", "bpe", "sentencepiece", "words", "raw")


# --------------------------------------------------------------------------------------------------
# tokens -> display text

def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes (control characters, space, ...) for the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTES = _byte_decoder()


def _decode_bpe(tokens: Sequence[str]) -> list[str]:
    """Byte-level BPE tokens as text (``"Ġcaf", "Ã©"`` -> ``" caf", "é"``). A character whose bytes are split
    over several tokens is shown at its last token, the earlier ones show ``"·"``. Tokens outside the byte
    alphabet (added special tokens) are kept, with only the whitespace markers replaced."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for t in tokens:
        if t and all(c in _BYTES for c in t):
            text = decoder.decode(bytes(_BYTES[c] for c in t))
            out.append(text + "·" if decoder.getstate()[0] else text)  # bytes pending: a split character
        else:
            out.append(decoder.decode(b"", final=True) + t.replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t"))
            decoder.reset()
    return out


# Closing punctuation that tokenizers without space markers split off: no space before it.
_CLOSING = re.compile(r"[,.;:!?)\]}%\u2026]+")


def detect_subwords(tokens: Sequence[str]) -> str:
    """The sub-word convention of ``tokens`` (one of :data:`SUBWORD_STYLES`), guessed from their markers."""
    tokens = [str(t) for t in tokens]
    if any(t.startswith(("Ġ", "Ċ")) for t in tokens):
        return "bpe"
    if any(t.startswith("▁") for t in tokens):
        return "sentencepiece"
    if any(t.startswith("##") and len(t) > 2 for t in tokens):
        return "wordpiece"
    if any(t[:1].isspace() or t[-1:].isspace() for t in tokens if t):
        return "raw"
    return "words"


def _pieces(tokens: Sequence[str], subwords: str) -> list[tuple[str, str, bool]]:
    """``(lead, core, partial)`` per token: see :func:`display_tokens`; ``partial``: the token holds only part
    of a character's bytes (byte-level BPE), shown as ``"·"``."""
    tokens = [str(t) for t in tokens]
    style = detect_subwords(tokens) if subwords == "auto" else subwords
    if style not in SUBWORD_STYLES:
        raise ValueError(f"unknown subwords={subwords!r}; valid: 'auto', {', '.join(map(repr, SUBWORD_STYLES))}")
    if style == "bpe":
        texts = _decode_bpe(tokens)
    elif style == "sentencepiece":
        texts = [t.replace("▁", " ") for t in tokens]
    elif style == "wordpiece":
        texts = [t[2:] if t.startswith("##") and len(t) > 2 else t if _CLOSING.fullmatch(t) else " " + t
                 for t in tokens]
    elif style == "words":
        texts = [t if _CLOSING.fullmatch(t) else " " + t for t in tokens]
    else:  # raw: a token's trailing whitespace separates it from the next one
        texts = list(tokens)
        for k in range(len(texts) - 1):
            core = texts[k].rstrip()
            if core:
                texts[k], texts[k + 1] = core, texts[k][len(core):] + texts[k + 1]
    out = []
    for k, text in enumerate(texts):
        if k == 0:
            text = text.lstrip(" ")
        partial = style == "bpe" and text.endswith("·") and not tokens[k].endswith("·")
        core = text.lstrip()
        lead = text[:len(text) - len(core)]
        if not core:  # a whitespace token: keep it visible
            core = ("↵\n" if "\n" in text else "␣") if text else ""
            lead = ""
        else:
            core = core.rstrip(" ")
        out.append((lead, core, partial))
    return out


def display_tokens(tokens: Sequence[str], subwords: str = "auto") -> list[tuple[str, str]]:
    """Each token as ``(whitespace before it, its visible text)``, markers resolved (see the module docs).

    Whitespace-only tokens become ``"␣"`` (spaces, tabs) or ``"↵"`` (newlines; followed by ``"\\n"``, a
    line break); the first token never gets leading whitespace; without space markers (``"words"``,
    WordPiece) closing punctuation such as ``,`` or ``.`` attaches to the word before it; a byte-level BPE
    token that holds only the first bytes of a character shows ``"·"`` (the character appears at its last
    token).
    """
    return [(lead, core) for lead, core, _ in _pieces(tokens, subwords)]


def merge_subwords(tokens: Sequence[str], relevance: Any, subwords: str = "auto") -> tuple[list[str], np.ndarray]:
    """Sum the relevance of the sub-word tokens of each word: returns ``(words, word relevance)``.

    A new word starts at every token with whitespace before it (see :func:`display_tokens`), so
    ``["Ġun", "believ", "able"]`` is one word ``"unbelievable"`` and ``["un", "##believ", "##able"]`` too;
    whitespace tokens (``"␣"``, ``"↵"``) stay words of their own. The sum keeps the total relevance
    (conservation).
    """
    r = _token_values(relevance, len(tokens))
    words: list[str] = []
    values: list[float] = []
    alone = False  # the previous piece was a whitespace token
    for (lead, core, partial), v in zip(_pieces(tokens, subwords), r):
        text = core.rstrip("\n")
        text = text[:-1] if partial else text
        space = text in ("␣", "↵") and not partial
        if not words or lead or space or alone:
            words.append(text)
            values.append(float(v))
        else:
            words[-1] += text
            values[-1] += float(v)
        alone = space
    return words, np.asarray(values)


# --------------------------------------------------------------------------------------------------
# values -> colours

def _token_values(relevance: Any, n: int) -> np.ndarray:
    """Relevance per token, float64 ``(n,)``: a trailing axis (e.g. an embedding) is summed."""
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == 2 and r.shape[0] == n:
        r = r.sum(-1)
    if r.shape != (n,):
        raise ValueError(f"relevance of shape {np.shape(relevance)} does not match {n} tokens (expected ({n},) or "
                         f"({n}, D))")
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


def _texts(tokens: Any, relevance: Any) -> tuple[list[list[str]], list[np.ndarray]]:
    """One text (a list of str) or several (a list of lists), with matching relevance."""
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of token strings (e.g. tokenizer.convert_ids_to_tokens(ids)), "
                        "not one string")
    tokens = list(tokens)
    if tokens and not isinstance(tokens[0], str) and hasattr(tokens[0], "__iter__"):
        texts = [[str(t) for t in text] for text in tokens]
        rel = list(relevance)
        if len(rel) != len(texts):
            raise ValueError(f"got {len(texts)} texts but relevance for {len(rel)}")
        return texts, [_token_values(r, len(t)) for r, t in zip(rel, texts)]
    texts = [[str(t) for t in tokens]]
    return texts, [_token_values(relevance, len(texts[0]))]


def _scaled(values: list[np.ndarray], mode: str, percentile: float | None, shared: bool) -> list[np.ndarray]:
    if shared:
        flat = _scale(np.concatenate(values)[None], mode, percentile, (-1,))[0]
        return np.split(flat, np.cumsum([len(v) for v in values])[:-1])
    return [_scale(v[None], mode, percentile, (-1,))[0] if len(v) else v for v in values]


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _ink(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on the background ``rgb``."""
    r, g, b = (int(c) for c in rgb)
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b >= 140 else (255, 255, 255)


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { margin: 16px; background: #ffffff; color: #000000; font-family: system-ui, -apple-system, "Segoe UI",
       "DejaVu Sans", Arial, sans-serif; }
h1.jlrp-title { font-size: 1.2em; margin: 0 0 0.6em 0; }
.jlrp-text { font-size: %(size)spx; line-height: 2.0; margin: 0 0 0.8em 0; max-width: 60em; }
.jlrp-tok { padding: 0.15em 0.08em; border-radius: 0.2em; white-space: pre-wrap; }
.jlrp-legend { margin-top: 1.2em; width: 24em; font-size: %(legend)spx; }
.jlrp-legend-bar { height: 1.1em; border: 1px solid #888888; }
.jlrp-legend-ticks { display: flex; justify-content: space-between; margin-top: 0.2em; }
.jlrp-legend-label { text-align: center; margin-top: 0.2em; }
"""


def _legend_html(cmap: Colormap, mode: str, label: str | None) -> str:
    lo, ticks, label = _colorbar_spec(mode, label, None)
    stops = np.linspace(lo, 1.0, 21)
    gradient = ", ".join(f"{_hex(c)} {100 * k / (len(stops) - 1):.0f}%"
                         for k, c in enumerate(_colorize(stops, cmap, mode)))
    tick_spans = "".join(f"<span>{html.escape(ticks[v])}</span>" for v in sorted(ticks))
    return (f'<div class="jlrp-legend" id="jlrp-legend">'
            f'<div class="jlrp-legend-bar" style="background: linear-gradient(to right, {gradient});"></div>'
            f'<div class="jlrp-legend-ticks">{tick_spans}</div>'
            f'<div class="jlrp-legend-label">{html.escape(label)}</div></div>')


def token_html(tokens: Sequence[str] | Sequence[Sequence[str]], relevance: Any, *, cmap: str | Colormap = "bwr",
               mode: str = "symmetric", percentile: float | None = DEFAULT_PERCENTILE, subwords: str = "auto",
               title: str | None = None, legend: bool = True, label: str | None = None,
               shared_scale: bool = False, font_size: int = 18) -> str:
    """A standalone HTML page (no scripts, no external files) showing tokens coloured by their relevance.

    Args:
      tokens: the token strings of one text, or a list of texts (one paragraph each).
      relevance: one value per token (``(T,)``, or ``(T, D)`` summed over ``D``), or a list of those.
      cmap, mode, percentile: as in :func:`jlrp.image.heatmap` (default: red = evidence for the explained
        output, blue = against; ``|R|`` clipped at the 99.5th percentile of its non-zero values).
      subwords: ``"auto"`` or one of :data:`SUBWORD_STYLES` (see :func:`display_tokens`).
      title: an optional heading.
      legend: add a colour legend (``id="jlrp-legend"``) with ``label`` (default
        :data:`jlrp.image.EVIDENCE_LABEL`).
      shared_scale: normalise all texts together (comparable colours) instead of each on its own.
      font_size: of the tokens, in CSS px.

    Every token is a ``<span class="jlrp-tok">`` whose ``title`` (tooltip) gives its relevance; token
    strings are HTML-escaped.
    """
    cm = get_colormap(cmap)
    texts, values = _texts(tokens, relevance)
    scaled = _scaled(values, mode, percentile, shared_scale)
    body = []
    if title:
        body.append(f'<h1 class="jlrp-title">{html.escape(title)}</h1>')
    for text, raw, v in zip(texts, values, scaled):
        colours = _colorize(v, cm, mode)
        spans = []
        for (lead, core), value, rgb in zip(display_tokens(text, subwords), raw, colours):
            newline = core.endswith("\n")
            core = core.rstrip("\n") if newline else core
            lead_html = html.escape(lead).replace("\n", "<br>")
            spans.append(f'{lead_html}<span class="jlrp-tok" style="background-color: {_hex(rgb)}; color: '
                         f'{_hex(_ink(rgb))};" title="relevance {value:+.4g}">{html.escape(core)}</span>'
                         + ("<br>" if newline else ""))
        body.append(f'<div class="jlrp-text">{"".join(spans)}</div>')
    if legend:
        body.append(_legend_html(cm, mode, label))
    css = _CSS % {"size": int(font_size), "legend": max(12, int(round(0.8 * font_size)))}
    head_title = html.escape(title or "token relevance")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{head_title}</title>\n<style>{css}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")


def save_token_html(path: str | Path, tokens: Sequence[str] | Sequence[Sequence[str]], relevance: Any,
                    **kwargs: Any) -> Path:
    """Write :func:`token_html` (same arguments) to ``path`` as UTF-8; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token_html(tokens, relevance, **kwargs), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# PNG

@lru_cache(maxsize=None)
def _unicode_font_file() -> str | None:
    """A TrueType font with wide Unicode coverage (DejaVu Sans: system fonts, else matplotlib's copy)."""
    candidates = ["DejaVuSans.ttf"]  # Pillow looks it up in the system's font folders
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(str(Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"))
    for c in candidates:
        try:
            ImageFont.truetype(c, 10)
            return c
        except OSError:
            continue
    return None


def _token_font(size: int):
    f = _unicode_font_file()
    return ImageFont.truetype(f, size) if f is not None else _font(size)


def token_image(tokens: Sequence[str] | Sequence[Sequence[str]], relevance: Any, *, cmap: str | Colormap = "bwr",
                mode: str = "symmetric", percentile: float | None = DEFAULT_PERCENTILE, subwords: str = "auto",
                title: str | None = None, legend: bool = True, label: str | None = None,
                shared_scale: bool = False, width: int = 800, font_size: int = 20, scale: int = 1) -> np.ndarray:
    """The token heatmap of :func:`token_html` drawn as a uint8 RGB image (Pillow), ``width * scale`` wide.

    Tokens wrap into lines at ``width``; every token is a box in its relevance colour with black or white
    text; a legend (colour bar with ``label``) is drawn below. ``scale`` multiplies every size (text is
    drawn at that size, not enlarged). Text uses DejaVu Sans when the system or matplotlib has it (else
    Pillow's bundled font, which lacks most non-Latin glyphs); the HTML version shows any script.
    """
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    cm = get_colormap(cmap)
    texts, values = _texts(tokens, relevance)
    scaled = _scaled(values, mode, percentile, shared_scale)
    s = int(scale)
    fs, w = int(font_size) * s, int(width) * s
    font = _token_font(fs)
    lh = _line_height(font)
    row_h = int(lh * 1.5)
    margin, box_pad = fs, max(1, fs // 8)
    space = max(_text_width(font, " "), fs // 4)
    items: list[tuple[float, float, str, tuple[int, int, int], tuple[int, int, int]]] = []  # x, y, text, bg, ink
    y = margin
    title_font = _token_font(int(fs * 1.2))
    title_lines = _wrap(title, title_font, w - 2 * margin) if title else []
    y += len(title_lines) * _line_height(title_font) + (fs // 2 if title_lines else 0)
    for text, v in zip(texts, scaled):
        x = margin
        for (lead, core), rgb in zip(display_tokens(text, subwords), _colorize(v, cm, mode)):
            newline = core.endswith("\n")
            core = core.rstrip("\n")
            gap = space * len(lead.replace("\n", "")) if lead else 0
            tw = _text_width(font, core) + 2 * box_pad
            if "\n" in lead or (x > margin and x + gap + tw > w - margin):
                x, y, gap = margin, y + row_h, 0
            x += gap if x > margin else 0
            items.append((x, y, core, tuple(int(c) for c in rgb), _ink(rgb)))
            x += tw
            if newline:
                x, y = margin, y + row_h
        y += row_h + fs // 2
    bar = None
    if legend:
        bar = colorbar(cm, mode, length=min(w - 2 * margin, 24 * fs), orientation="horizontal", label=label,
                       font_size=max(12 * s, int(0.8 * fs)), thickness=int(0.9 * fs))
    height = y + (bar.shape[0] + fs if bar is not None else 0) + margin // 2
    canvas = Image.new("RGB", (w, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((margin, margin + k * _line_height(title_font)), line, fill=(0, 0, 0), font=title_font)
    for x, ty, core, bg, ink in items:
        l, _, r, _ = font.getbbox(core) if core else (0, 0, 0, 0)
        draw.rounded_rectangle([x, ty, x + (r - l) + 2 * box_pad, ty + lh + 2 * box_pad], radius=box_pad,
                               fill=bg)
        draw.text((x + box_pad - l, ty + box_pad), core, fill=ink, font=font)
    if bar is not None:
        canvas.paste(Image.fromarray(bar), (margin, y))
    return np.asarray(canvas)


def save_token_png(path: str | Path, tokens: Sequence[str] | Sequence[Sequence[str]], relevance: Any,
                   **kwargs: Any) -> Path:
    """Write :func:`token_image` (same arguments) as a PNG; returns the path."""
    path = Path(path)
    save_png(path, token_image(tokens, relevance, **kwargs))
    return path
