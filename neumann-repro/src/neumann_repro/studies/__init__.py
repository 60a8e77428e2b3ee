"""One module per study; each declares ``STUDY``, its entry (see :mod:`neumann_repro.registry`)."""
