"""State shared by every aioproxy instance pointing at one Redis (``[state] redis_url``).

* ``link``: the Redis client, its health (down: per-process fallback, logged once) and resume.
* ``counters``: key and team rpm, tpm, max_parallel and budget counters, atomic Lua scripts.
* ``changes``: publish/subscribe: key and team changes, deployment cooldown (also kept in
  Redis until it ends, for the instances that subscribe meanwhile).
* ``shared``: the ``shared`` plugin that wires them into the app at start-up.
* ``preflight``: ``--workers N > 1`` refuses per-process limits.
"""
