"""Runs of the models: pretraining, few-shot evaluation, the objective comparison and the
``recon`` command (see python_models)."""
