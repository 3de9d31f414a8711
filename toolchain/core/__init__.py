"""The bottom layer: errors, versions, the artifact cache, device profiles, ONNX I/O, text writers.
Imports nothing else of edgec."""
