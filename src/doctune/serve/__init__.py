"""OpenAI-compatible serving of a base model and its LoRA adapters (`doctune serve`), with a chat page.

engine.py batches generation; app.py is the HTTP API; web/index.html the page; chat.py (one level up) the
terminal chat. Heavy libraries load only when an engine is built.
"""
