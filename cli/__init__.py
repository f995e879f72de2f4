"""The ``nst`` command line: the shell over ``engine`` (which never imports it).

``main`` parses (``cli/main.py``) and dispatches to ``stylize``/``resume`` (``cli/stylize.py``),
``compare`` (``cli/compare.py``), ``plot`` (``cli/plot.py``), ``export``/``validate`` (``export/``) and
the commands other packages register through the ``nst.commands`` entry point (``bench``, ``serve``).
"""
