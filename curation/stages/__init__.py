"""Pipeline stages, one module each; ``curation.stages.registry.load_all`` imports them, which registers them."""
