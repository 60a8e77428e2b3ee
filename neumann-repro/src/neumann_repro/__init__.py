"""The reproduction of the Neumann optimizer paper's claims at small scale: ``neumann-repro STUDY``.

A distribution of its own beside the library (``neumann-optimizer`` ships the optimizer alone).
Each study is a module under :mod:`neumann_repro.studies` with one entry in
:mod:`neumann_repro.registry`; ``neumann-repro report`` renders docs/REPRODUCTION.md from the
committed results without training.
"""
