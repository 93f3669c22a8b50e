"""Stages of the retrain flow (a module or package each) and the shared pieces they use: docs/design.md."""
