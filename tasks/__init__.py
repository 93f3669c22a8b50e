"""Stages of the retrain flow, one module each, plus the shared pieces (store, hardware, models, rewards)."""
