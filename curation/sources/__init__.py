"""Sources: where the long videos come from (Panda-70M CSV, a folder, the bundled sample)."""
