"""Schedules for the PrimFuncs no hand-written kernel covers (the vector rule)."""
