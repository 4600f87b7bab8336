"""Pure algorithm kernels on tensors: no nn.Module, no I/O, no model knowledge."""
