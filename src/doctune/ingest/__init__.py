"""ingest: a folder of documents → token-counted chunks (`chunks.jsonl`) and `ingest_report.json`.

- `readers.py`: one reader per format (.pdf, .md/.markdown, .txt), chosen by suffix; each streams a document's
  text and raises `Unreadable` (with a short reason) for a file that cannot be used.
- `chunking.py`: token counters and the streaming chunker (paragraph > sentence > line > word > character
  boundaries, overlap between consecutive chunks).
- `stage.py`: `run(cfg)`: walk the data folder, read, chunk, write, record the manifest entry.
"""
