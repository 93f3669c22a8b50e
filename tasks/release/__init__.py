"""Stage: release to the artifact store. ``stage`` holds the Prefect task ``release`` (manifest
last, LATEST after it); ``ops`` the operators' moves of LATEST (list, show, promote, rollback, fetch);
``retention`` pruning of old releases' weights and old stage folders."""
