"""Pictures of explanations: heatmaps, colour bars, overlays, input tiles, method grids, token heatmaps (HTML
and PNG), PNG input/output, and (with matplotlib, the optional ``plot`` extra) vector figures and curve plots.

* Colour maps: :data:`COLORMAPS` (``bwr``, ``seismic``, ``coldnhot``, ``gray``, ``hot``), :func:`get_colormap`.
  With the signed maps red is evidence for the explained output and blue evidence against it.
* One map: :func:`normalize`, :func:`heatmap`, :func:`overlay` (on the input), :func:`input_tile` (the input
  itself as a display tile), :func:`colorbar` / :func:`add_colorbar` (labelled :data:`EVIDENCE_LABEL`).
  Outliers are clipped at the :data:`DEFAULT_PERCENTILE` (99.5th) percentile of the non-zero ``|R|`` of each
  map; ``percentile=None`` turns that off.
* Figures: :func:`grid` (any tiles, row/column titles), :func:`method_grid` (samples x methods with a colour
  bar), :func:`save_method_grid` (PNG, or vector SVG/PDF sized for a paper), :func:`save_png` /
  :func:`load_png`, :func:`plot_curves` (PNG/SVG/PDF; distinct line styles and markers).
* Text: :func:`token_html` / :func:`save_token_html` (standalone HTML with coloured spans and a legend),
  :func:`token_image` / :func:`save_token_png`, for the token strings of any tokenizer
  (:func:`display_tokens`, :func:`detect_subwords`, :func:`merge_subwords` handle ``##``, ``Ġ`` and ``▁``).
"""
from jlrp._src.image import (COLORMAPS, CURVE_STYLES, DEFAULT_PERCENTILE, EVIDENCE_LABEL, Colormap, add_colorbar,
                             colorbar, get_colormap, grid, heatmap, input_tile, load_png, method_grid, normalize,
                             overlay, plot_curves, save_method_grid, save_png)
from jlrp._src.text import (SUBWORD_STYLES, detect_subwords, display_tokens, merge_subwords, save_token_html,
                            save_token_png, token_html, token_image)

__all__ = ["COLORMAPS", "CURVE_STYLES", "DEFAULT_PERCENTILE", "EVIDENCE_LABEL", "SUBWORD_STYLES", "Colormap",
           "add_colorbar", "colorbar", "detect_subwords", "display_tokens", "get_colormap", "grid", "heatmap",
           "input_tile", "load_png", "merge_subwords", "method_grid", "normalize", "overlay", "plot_curves",
           "save_method_grid", "save_png", "save_token_html", "save_token_png", "token_html", "token_image"]
