"""Launch: the typed run config, the driver (`python -m launch.train`), configs and cluster files."""
