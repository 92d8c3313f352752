"""HDF5 files: checkpoints, the metrics log, plots."""
