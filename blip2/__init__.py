"""The core that `training/` and `service/` share: what both sides must compute alike.

It imports neither of them (both import it), and nothing heavier than the standard library.
"""
