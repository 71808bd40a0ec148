"""doctune: turn a folder of documents into a fine-tuned domain chatbot, and prove whether it got better."""

__version__ = "0.1.0"
