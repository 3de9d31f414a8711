"""Measuring: one timing path (``timing``), its statistics (``stats``), judging outputs (``compare``) and
bench jobs (``job``). Sits low: passes time layers too."""
