"""Distilled sets as artifacts: the set folder, ``DistilledDataset`` and the Hub. Imports no stage."""
