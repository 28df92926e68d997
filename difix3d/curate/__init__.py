"""Paired-data curation: strategies that make (artifact render, clean image, reference) triplets, quality
filters, the Ray job writing pair shards, and contact sheets to look at them."""
