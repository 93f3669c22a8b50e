"""Prefect blocks that operators edit in the UI (where artifacts live, and with which credentials)."""
