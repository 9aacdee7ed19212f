"""The response cache (``[cache]``): exact-match answers kept in memory or in Redis.

* ``lookup``: whether a request may be cached, and its key (scope, kind, model, body).
* ``stores``: an LRU in memory (bounded in entries and bytes) and Redis (with TTLs).
* ``replay``: a cached answer in the form asked for (stream <-> JSON).
* ``coalescing``: identical misses arriving together: one goes upstream, the others wait for it.
* ``response_cache``: the ``response_cache`` plugin: look up before the upstream, record after it.
"""
