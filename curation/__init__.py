"""Curation: long videos in, text-image-video triplet shards out (Phantom §3.1)."""
