"""Pipeline stages, one module each; ``curation.stages.registry.load_all`` imports (and so registers) them."""
