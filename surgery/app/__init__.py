"""Applications on top of the core: the ``surgery`` command line (:mod:`~surgery.app.cli`), the
demo (:mod:`~surgery.app.demo`) and TOML recipes (:mod:`~surgery.app.recipe`). Nothing in the
core imports this package; it may import ``passes`` (lazily).
"""
