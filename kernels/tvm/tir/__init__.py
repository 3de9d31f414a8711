"""PrimFunc builders for the hand-written kernels (no Relax here: the passes in kernels.tvm.passes call these)."""
