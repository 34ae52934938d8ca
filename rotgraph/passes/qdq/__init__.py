"""Lowering for standard QDQ ONNX (edge compilers): rotgraph's functions and ops expanded into standard ops at a chosen opset."""
