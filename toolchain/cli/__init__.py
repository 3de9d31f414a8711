"""The CLI's verb groups (``cli.py`` registers them): ``artifacts`` (export .. build, inspect, demo),
``tune``, ``catalog`` (profiles, zoo), ``device`` (serve), ``decide`` (pick, ci); ``common`` holds the
shared options, output and error handling."""
