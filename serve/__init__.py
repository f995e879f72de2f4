"""``nst serve``: the engine as an HTTP service with a live web page (FastAPI + uvicorn, the ``serve`` extra).

Builds on ``engine`` (one long-lived ``engine.Engine``); ``engine`` never imports this package.
"""
