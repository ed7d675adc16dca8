"""Operator controls shared by the `mailrail` command line and ingest's admin API and /ui."""
