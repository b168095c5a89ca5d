"""Policies that drive the agent graph: offline (deterministic rules) and llm (OpenAI-compatible)."""
