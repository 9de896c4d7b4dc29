"""The core that `training/` and `service/` share: what both sides must compute alike (prompts and task
defaults, text processing, vocabulary checks, the Q-Former's feature and score arithmetic).

It imports neither of them (both import it), and nothing beyond the project's own dependencies (torch,
transformers, tokenizers: those both images install).
"""
