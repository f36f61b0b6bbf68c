"""Configs of the paper's figures and tables (``get_config`` + ``get_sweep``)."""
