"""The `surgenet-assist` command line: the one composition root that imports every front-end."""
