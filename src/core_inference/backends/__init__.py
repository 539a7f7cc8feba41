"""Built-in backends, one module per engine; each imports its engine only in ``load_model``."""
