"""Serving the dashboard: a Bokeh server with one independent
:class:`~xrfnb.ui.dashboard.Dashboard` per browser session, local resources only, loopback by default,
and an optional log-in (password or token)."""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import logging
import os
import secrets
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import panel as pn

from ..._errors import DataError, XRFNBError
from .app import Dashboard, make_app
from .bokeh import keep_session_until_connected
from .common import ensure_extensions
from .data import warm_up
from .files import serve_target, serve_target_from_args

__all__ = [
    "LOADING_TEXT",
    "LOGIN_TEMPLATE",
    "auth_setting",
    "is_loopback",
    "loading_page",
    "serve",
    "serve_app",
]

log = logging.getLogger(__name__)


def _exception_handler(exc: Exception) -> None:
    log.error("unhandled dashboard error", exc_info=exc)
    notifications = getattr(pn.state, "notifications", None)
    if notifications is not None:
        msg = str(exc) if isinstance(exc, XRFNBError) else f"internal error ({type(exc).__name__}: {exc})"
        notifications.error(msg, duration=10000)


def is_loopback(address: str) -> bool:
    """Whether ``address`` (host name or IP) binds only this machine's loopback interface."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    path: str | os.PathLike[str] | None = None,
    port: int = 5006,
    address: str = "127.0.0.1",
    show: bool = False,
    *,
    max_upload_mb: float = 256.0,
    threaded: bool = False,
    basic_auth: str | os.PathLike[str] | dict[str, str] | None = None,
    token: str | bool | None = None,
) -> Any:
    """Serve the dashboard with Bokeh/Panel, one independent :class:`Dashboard` per browser session.

    Parameters
    ----------
    path : path-like, optional
        A scan file (its folder is served and it opens first) or a data folder. None: the demo scene.
    port : int, optional
        TCP port.
    address : str, optional
        Interface to bind; loopback unless told otherwise. Any other address (``"0.0.0.0"``: every
        interface) lets anyone who can reach this machine read the served folder: a warning says so,
        and ``basic_auth`` or ``token`` should protect it.
    show : bool, optional
        Open a browser tab.
    max_upload_mb : float, optional
        Largest accepted upload in MiB (enforced on the server as the bytes arrive).
    threaded : bool, optional
        Run the server in a background thread and return it (``.stop()`` ends it); otherwise block.
    basic_auth : str, path-like or dict, optional
        Require a log-in (Panel's basic-auth provider, a ``/login`` page and a signed cookie): a
        password (any user name), a ``{user: password}`` mapping, or the path of a JSON file holding one.
    token : str or True, optional
        Require a shared secret as the password on the ``/login`` page (any user name); ``True`` makes a
        random one and logs it, for handing to colleagues. Cannot be combined with ``basic_auth``.

    Returns
    -------
    object
        The Panel server (or its thread when ``threaded``).

    Notes
    -----
    The scan a new session opens first (``path``'s file, or the demo) is read and mapped in a background
    thread as the server starts (:func:`~xrfnb.ui.dashboard.data.warm_up`): the first page finds its maps
    ready, or being made, instead of starting them.

    Raises
    ------
    DataError
        ``path`` does not exist; both ``basic_auth`` and ``token``; an empty password or token; a
        ``basic_auth`` file that does not exist.
    """
    data_dir, initial = serve_target(path)
    auth = auth_setting(basic_auth, token)
    log.info("xrfnb dashboard on http://%s:%s (data folder: %s)", address, port, data_dir)
    if not is_loopback(address):
        where = f"the served folder {data_dir}" if data_dir is not None else "the demo scene and uploads"
        log.warning(
            "serving on %s: anyone who can reach this machine on port %s can open %s%s",
            address,
            port,
            where,
            " (a log-in is required)" if auth is not None else "; give a password or token for a log-in",
        )

    def app() -> pn.viewable.Viewable:
        # a plain function: Panel calls functions and methods once per session, but renders any other
        # callable (a functools.partial) as its repr text
        return loading_page(lambda: make_app(data_dir, initial, max_upload_mb))

    # the first session finds the scan it opens, and its maps, made or being made
    warm_up(data_dir, initial)
    return serve_app(app, port=port, address=address, show=show, threaded=threaded, basic_auth=auth)


#: (data folder, first file) pairs whose warm-up ``page_from_cli_args`` started in this process
_WARMED: set[tuple[Path | None, str | None]] = set()


def page_from_cli_args(argv: Sequence[str] | None = None) -> pn.viewable.Viewable:
    """The page ``panel serve dashboards/xrfnb_app.py [--args FILE_OR_DIR]`` serves, as :func:`serve`'s.

    The data folder (or file) is the first argument after ``--args``, else ``$XRFNB_DATA``; with neither,
    the demo scene. Panel runs the app script once per session: the first one starts the warm-up of the
    scan a session opens first (:func:`~xrfnb.ui.dashboard.data.warm_up`; once per process and target),
    and every session gets the small loading page (:func:`loading_page`) instead of seconds of blank page.
    """
    data_dir, initial = serve_target_from_args(argv)
    if (data_dir, initial) not in _WARMED:
        _WARMED.add((data_dir, initial))
        warm_up(data_dir, initial)
    return loading_page(lambda: make_app(data_dir, initial))


#: what a new page shows while its dashboard is being built
LOADING_TEXT = (
    "Loading the xrfnb dashboard: building the page, then opening the scan and its pigment maps "
    "(the first page after the server started can take half a minute) ..."
)


def loading_page(make: Callable[[], Dashboard]) -> pn.viewable.Viewable:
    """A session's page that shows :data:`LOADING_TEXT` at once and ``make()``'s dashboard once the page
    is drawn.

    The dashboard's own models (about 300) take seconds to build, and Bokeh sends a page only once its
    document is built: the browser showed a blank page all that time. This page is small; the dashboard
    is built when the browser has drawn it (``pn.state.onload``) and replaces the text in place. Outside a
    server session the dashboard is built at once.
    """
    keep_session_until_connected()
    text = pn.pane.HTML(
        f'<div class="xrfnb-starting" style="font-size:15px;padding:12px">{LOADING_TEXT}</div>',
        sizing_mode="stretch_width",
    )
    page = pn.Column(
        pn.pane.Markdown("## xrfnb: pigment maps from XRF scans", sizing_mode="stretch_width"),
        text,
        pn.indicators.Progress(value=-1, active=True, width=300, bar_color="info"),
        sizing_mode="stretch_width",
    )

    def build() -> None:
        try:
            dash = make()
        except Exception as exc:  # said on the page, not left at "Loading"
            log.error("building the dashboard failed", exc_info=exc)
            msg = str(exc) if isinstance(exc, XRFNBError) else f"internal error ({type(exc).__name__})"
            page.objects = [pn.pane.Alert(f"The dashboard could not be built: {msg}", alert_type="danger")]
            return
        page.objects = [dash]

    pn.state.onload(build)
    return page


def auth_setting(
    basic_auth: str | os.PathLike[str] | dict[str, str] | None, token: str | bool | None
) -> str | dict[str, str] | None:
    """What Panel's ``basic_auth`` option gets for :func:`serve`'s ``basic_auth`` and ``token``."""
    if basic_auth is not None and token not in (None, False):
        raise DataError("pass either a password (basic_auth) or a token, not both")
    if token is True:
        token = secrets.token_urlsafe(16)
        log.warning("log-in token for this dashboard (any user name): %s", token)
    if isinstance(token, str):
        if not token.strip():
            raise DataError("the dashboard token is empty: give a non-empty secret, or True for a random one")
        return token
    if basic_auth is None:
        return None
    if isinstance(basic_auth, dict):
        if not basic_auth or not all(isinstance(v, str) and v for v in basic_auth.values()):
            raise DataError("basic_auth: give a {user: password} mapping with non-empty passwords")
        return {str(k): v for k, v in basic_auth.items()}
    text = os.fspath(basic_auth)
    if not text:
        raise DataError("basic_auth: the password is empty")
    looks_like_file = isinstance(basic_auth, os.PathLike) or text.lower().endswith(".json")
    if looks_like_file:
        p = Path(text).expanduser()
        if not p.is_file():
            raise DataError(f"basic_auth: the credentials file {p} does not exist")
        return str(p.resolve())
    return text


#: log-in page for basic auth / token (Panel's own loads its logo and icon from a CDN)
LOGIN_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xrfnb: log in</title>
<link rel="icon" href="data:,">
<style>body{font-family:sans-serif;background:#f4f4f4;display:flex;justify-content:center;margin-top:12vh}
form{background:#fff;padding:2em 2.5em;border-radius:6px;box-shadow:0 1px 4px #0003;width:20em}
input,button{display:block;width:100%;margin:.6em 0;padding:.5em;box-sizing:border-box;font-size:1em}
.err{color:#b00020;font-weight:bold}</style></head>
<body><form action=".{{ login_endpoint }}" method="post">
<h2>xrfnb dashboard</h2><p>Log in with the user name and password (or token) you were given.</p>
<p class="err">{{ errormessage|escape }}</p>
<input name="username" type="text" autocapitalize="off" autocorrect="off" placeholder="user name">
<input name="password" type="password" placeholder="password or token">
<button type="submit">Log in</button></form></body></html>
"""


def serve_app(
    factory: Callable[[], Any],
    *,
    port: int,
    address: str = "127.0.0.1",
    show: bool = False,
    threaded: bool = False,
    basic_auth: str | dict[str, str] | None = None,
    server_options: Mapping[str, Any] | None = None,
) -> Any:
    """Serve ``factory()`` (called once per browser session) with local resources and error notifications.

    ``factory`` must be a plain function or method: Panel renders any other callable as text.
    ``basic_auth`` (a password, a ``{user: password}`` mapping or a JSON file of one) turns on Panel's
    basic-auth provider: every page and websocket then needs the signed cookie ``/login`` sets.
    ``server_options`` are further Bokeh server options (``unused_session_lifetime_milliseconds``,
    ``check_unused_sessions_milliseconds``, ...), passed on as they are.
    """
    if not (inspect.isfunction(factory) or inspect.ismethod(factory)):
        raise TypeError(f"serve_app needs a plain function or method, not {type(factory).__name__}")
    ensure_extensions()
    pn.config.exception_handler = _exception_handler
    hosts = {address, "localhost", "127.0.0.1"}
    if not is_loopback(address):  # other machines reach it under this machine's names and addresses
        with contextlib.suppress(OSError):
            name, aliases, ips = socket.gethostbyname_ex(socket.gethostname())
            hosts |= {name, socket.getfqdn(), *aliases, *ips}
    origins = sorted(f"{h}:{port}" for h in hosts if h)
    auth: dict[str, Any] = {}
    if basic_auth is not None:
        # a fresh secret per server signs the log-in cookie (Panel needs one for basic auth)
        template = Path(tempfile.mkdtemp(prefix="xrfnb-login-")) / "login.html"
        template.write_text(LOGIN_TEMPLATE, encoding="utf-8")
        auth = {
            "basic_auth": basic_auth,
            "cookie_secret": secrets.token_hex(32),
            "basic_login_template": str(template),
        }
    return pn.serve(
        factory,
        port=port,
        address=address,
        show=show,
        threaded=threaded,
        title="xrfnb",
        websocket_origin=origins,
        websocket_max_message_size=16 * 2**20,
        start=True,
        **auth,
        **dict(server_options or {}),
    )
