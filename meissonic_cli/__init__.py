"""meissonic: curate, tokenize, train, sample, edit and evaluate Meissonic masked image transformers.

Importing this package is cheap: heavy libraries (torch, duckdb, open_clip, diffusers) are imported
inside the modules and commands that need them, so `meissonic --help` stays fast.
"""

__version__ = "0.1.0"
