"""Figure builders for notebooks and dashboards (HoloViews/Bokeh), and small analysis helpers.

A public submodule: ``from xrfnb import plotting`` or ``xrfnb.plotting.spectrum_plot(...)``. HoloViews is
imported only when this module is.
"""

from .ui.plotting import *  # noqa: F403
from .ui.plotting import __all__  # noqa: F401
