"""Run configs: `get_config(arg)` functions (`--config=configs/FILE.py[:ARG]`)."""
