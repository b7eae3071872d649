"""The models: one file per model family on the shared blocks (see python_models)."""
