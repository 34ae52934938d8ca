"""Learning rotations for `rotgraph learn` (the entry point and its options are in `rotgraph.learn`).

- `loop`: the one learning loop (Cayley SGD on the rotations, cosine learning rate, checkpoints and
  resume, data parallel under torchrun, the orthogonality check) and the `Objective` it learns against;
- `end_to_end`: SpinQuant's objective, the fake-quantized network's loss (`RotatedNetwork`);
- `layerwise`: the kurtosis and output-error objectives on collected activations, and learned scales;
- `quantizers`: the torch fake quantizers (activations and KV cache, weights) with straight-through
  rounding, on the grids of `rotgraph.grid`;
- `stiefel`: the Cayley SGD optimizer;
- `torch_graph`, `torch_ops`, `torch_attention`: the ONNX graph run with torch ops, so that autograd
  flows through it.
"""
