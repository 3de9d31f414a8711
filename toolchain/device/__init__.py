"""Devices: the protocol client and device share (``protocol``), the client's authenticated session
(``session``), the farm that spreads bench jobs over devices (``farm``), and the device server (``server``,
which loads runners and so sits above ``targets``)."""
