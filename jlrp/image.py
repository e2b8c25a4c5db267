"""Heatmaps: colour maps (bwr, seismic, coldnhot, gray, hot), normalisation, overlays, image grids, PNG
output, and perturbation-curve plots (matplotlib, the optional ``plot`` extra)."""
from jlrp._src.image import (COLORMAPS, Colormap, get_colormap, grid, heatmap, load_png, normalize, overlay,
                             plot_curves, save_png)

__all__ = ["COLORMAPS", "Colormap", "get_colormap", "grid", "heatmap", "load_png", "normalize", "overlay",
           "plot_curves", "save_png"]
