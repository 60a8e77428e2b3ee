"""Small-scale reproduction of the paper's studies: ``neumann-repro STUDY`` (extra ``[repro]``)."""
