"""The optimizers the studies compare: their names in configs, their labels in tables and plots,
and which of them are baselines."""

from __future__ import annotations

# "neumann": the paper's Table 1 (configs without a repulsive_weight name the paper's, as every run
# committed before the default changed); "neumann-default": the library's default, no repulsive term
LABELS = {
    "neumann": "Neumann, paper's regularizers",
    "neumann-default": "Neumann (default: no repulsive term)",
    "neumann-lr": "Neumann, regularizers scaled with lr (ours)",
    "neumann-adaptive": "Neumann, adaptive mu (ours)",
    "sgd": "SGD+Nesterov",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "rmsprop-inception": "RMSprop as in Inception (decay 0.9, momentum 0.9, eps 1.0)",
    "lars": "LARS",
    "lamb": "LAMB",
}
BASELINES = ("sgd", "adam", "adamw", "rmsprop", "rmsprop-inception", "lars", "lamb")
