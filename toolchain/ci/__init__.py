"""``edgec ci``: a project file (``config``) -> build, measure and gate every model (``run``) -> JSON,
JUnit XML and markdown reports (``report``)."""
