"""The xrfnb dashboard as a Panel app: ``panel serve dashboards/xrfnb_app.py``.

The served data folder is taken from the ``XRFNB_DATA`` environment variable or from
``panel serve dashboards/xrfnb_app.py --args FOLDER_OR_FILE``; without either, the demo scene opens
(when it is available). Only files inside that folder can be opened. ``xrfnb serve`` does the same
with a command-line interface and binds to 127.0.0.1. As there, each page is first a small loading page
and the scan a session opens first is read and mapped in the background.
"""

import xrfnb

xrfnb.Dashboard.page_from_cli_args().servable(title="xrfnb")
