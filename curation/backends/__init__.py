"""Model backends, one small Protocol per capability, registered by name (see curation.stage)."""
