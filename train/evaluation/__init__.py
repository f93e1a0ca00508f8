"""Evaluation of trained SAEs, one idea per module:

- `tokens`: rebuild the token grid harvest fed the model, from the dump's rows;
- `reconstruction`: MSE, explained variance, L0, density, shrinkage, from the stored activations;
- `geometry`: whole-SAE diagnostics of the decoder (nearest-neighbour cosine similarity);
- `downstream`: the language model's loss with the SAE spliced in (CE loss recovered, KL);
- `run_eval`: one trained SAE folder on its dump's held-out contexts, as one JSON-able dict;
- `examples`: a feature's strongest rows, from the dump alone;
- `feature_stats`: one streaming pass over the dump for every feature's statistics;
- `logit_table`: the output tokens each feature's decoder direction promotes and suppresses;
- `dashboard`: the static HTML dashboard written from those statistics;
- `cli`: the `evaluate` command.
"""
