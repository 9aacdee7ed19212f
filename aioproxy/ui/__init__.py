"""The operators' dashboard at ``/ui`` (``[ui] enabled``), served by the gateway itself.

* ``dashboard``: the plugin (routes, templates, security headers, the playground's principal).
* ``session``: sign-in sessions (signed cookies) and CSRF tokens.
* ``pages``: the server-rendered pages; ``actions``: what changes state (JSON, CSRF-checked).
* ``queries``: the overview's series and one request's row, from the request log.
* ``static/``: our script and style, and uPlot (MIT, vendored with its licence).
"""
