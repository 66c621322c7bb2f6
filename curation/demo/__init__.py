"""Demo data, built outside the product: the bundled sample footage and synthetic tables for benches."""
