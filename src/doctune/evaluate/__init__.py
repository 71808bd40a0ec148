"""`doctune eval`: candidates answer a held-out eval set; answers are scored against the references (ROUGE,
token F1, exact match, MiniLM similarity, LLM judge) and compared with bootstrap confidence intervals.

metrics.py (per-answer metrics), scoring.py (computes them off the event loop), judge.py (LLM judge),
stats.py (bootstrap aggregates), report.py (report.md / report.html), stage.py (the stage: `run(cfg)`).
"""
