"""Difix fine-tuning: Parquet pair shards, the distributed data reader, losses and the Ray Train loop.

Importing this package stays cheap (no Ray, no model); import the submodules you need.
"""
