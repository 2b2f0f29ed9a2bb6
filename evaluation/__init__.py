"""Scoring generated images: the toy reward rules, the scorer registry, summaries and win rates."""
