"""The agent: graph, policies, the DuckDB store and the command line."""
