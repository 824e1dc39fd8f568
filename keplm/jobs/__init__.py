"""Thin entrypoints: `keplm <job>` and `python -m keplm.jobs.<job>` run the same function."""
