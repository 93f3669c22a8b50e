"""Plumbing: the small pieces every stage uses. ``stage`` (the stage skeleton, ``StageContext``,
cache keys), ``common`` (Prefect shim, dtypes, tokenizer, artifacts), ``fingerprints`` (what a stage
runs and reads), ``models`` (model sources, chat templates), ``sources`` + ``hub_ids`` (dataset readers:
local, S3, hub, generated), ``scoring`` (answer extraction and matching, shared by evaluation and
GRPO's rewards), ``resources/`` (bundled self-cognition rows and identity questions). Never imports a
stage."""
