"""What `harvest` and `train` both need: the dump format, its reader, model loading, errors.

Data flow: harvest -> shared <- train. `harvest` and `train` never import each other.
"""
