"""The retrain flow, its parameters and the ``tuneline`` command."""
