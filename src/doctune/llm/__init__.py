"""Model backends behind one interface (base.LLM). Knows nothing of QA pairs."""
