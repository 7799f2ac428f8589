"""Layer-wise pruning: block by block over calibration inputs, with memory bounded by one block."""
