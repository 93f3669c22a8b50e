"""Plumbing: the artifact store every stage writes to. ``store`` (local folder or ``s3://``),
``locks`` (the one lock mechanism: conditional writes, flock), ``stage_folders`` (publishing a stage
folder atomically), ``checkpoint_sync`` (checkpoints to an ``s3://`` store) and ``registry`` (releases,
LATEST and the champion). Never imports a stage."""
