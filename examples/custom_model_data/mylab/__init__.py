"""An example user package: a model, a dataset and a loss for hpcfed jobs."""
