"""edgec's toolchain. Layers, bottom to top (each imports only those below it):
core -> measure, device (protocol, session, farm) -> zoo, passes, export -> [targets, kernels] -> bench,
device.server -> pipeline, report -> pick, ci -> api -> cli."""
