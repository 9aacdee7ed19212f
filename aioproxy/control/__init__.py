"""The operator's control plane: keys and teams in a database, their limits, spend and the
request log, each an ordinary plugin on the hook contract (see ``aioproxy.plugins.DEFAULT_PLUGINS``).

* ``database``: opens and migrates the database, holds the app's ``ControlPlane``, serves the
  admin API (``admin``) and adds the rate-limit headers.
* ``keyauth``: ``authenticate`` for database keys, from an in-memory cache (``cache``), wrapping
  the config's keys.
* ``limits``: rpm, tpm, max_parallel, budget, per key and team (``meters``).
* ``spend``: the cost of each request (``pricing``), the usage chunk of streams (``usage_tap``),
  and the request log (``requestlog``).
"""
