"""`doctune ingest` on a hostile folder: links in loops and out of the folder, unreadable and undecodable files,
pipes, deep nesting, odd names, broken PDFs, binary junk, and a 100 MB text file. The run must finish, read
every good file, report every bad one with its reason, never read outside the data folder, never write into it,
and keep memory bounded."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.ingest.pdfs import (
    paragraphs,
    wrap,
    write_drawing_only_pdf,
    write_encrypted_pdf,
    write_pdf,
    write_truncated_pdf,
)

from doctune.config import build_config
from doctune.ingest import readers
from doctune.ingest.stage import run
from doctune.runs import read_jsonl

SECRET = "TOP SECRET text that lives outside the data folder."


def build_hostile(tmp: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The data folder, its good files (path -> a phrase from it) and its bad ones (path -> reason)."""
    data = tmp / "data"
    data.mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    good = {}

    def text_file(rel: str, phrase: str) -> None:
        path = data / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{phrase}\n\n" + "\n\n".join(paragraphs(2, seed=len(rel))), encoding="utf-8")
        good[rel] = phrase

    text_file("Résumé du projet.md", "Le résumé du projet, avec des accents.")
    text_file("日本語 ファイル.txt", "日本語のファイルです。")
    text_file("name  with   spaces .txt", "A file name with runs of spaces.")
    deep = "/".join(f"level{i}" for i in range(60))
    text_file(f"{deep}/deep.md", "A document sixty folders down.")
    manual = write_pdf(data / "manual.pdf", [wrap(p) for p in paragraphs(3, seed=7)])
    good["manual.pdf"] = paragraphs(3, seed=7)[0].split()[1]
    (data / "no-spaces.txt").write_text("QUJD" * 500_000)  # 2 MB in one "word", like a base64 blob
    good["no-spaces.txt"] = "QUJDQUJD"

    bad = {}
    os.symlink("self-loop.txt", data / "self-loop.txt")
    bad["self-loop.txt"] = "symlink loop"
    os.symlink("ping.md", data / "pong.md")
    os.symlink("pong.md", data / "ping.md")
    bad["ping.md"] = bad["pong.md"] = "symlink loop"
    (data / "sub").mkdir()
    os.symlink("..", data / "sub" / "up")
    bad["sub/up/"] = "symlink loop"
    os.symlink(outside / "secret.txt", data / "secret-link.txt")
    bad["secret-link.txt"] = "link outside data folder"
    os.symlink(outside, data / "outside-folder")
    bad["outside-folder"] = "link outside data folder"
    os.symlink(data / "no-such-file.md", data / "broken.md")
    bad["broken.md"] = "broken link"
    os.symlink("../Résumé du projet.md", data / "sub" / "inside-link.md")  # followed: it stays inside
    bad["sub/inside-link.md"] = "duplicate"  # ... and its content was read already
    os.mkfifo(data / "pipe.txt")
    bad["pipe.txt"] = "not a regular file"
    (data / "locked.txt").write_text("a file nobody may read\n")
    bad["locked.txt"] = "unreadable"
    with open(os.fsencode(data) + b"/caf\xe9-latin1-name.txt", "wb") as f:
        f.write(b"a file whose name is not UTF-8\n")
    bad["caf\ufffd-latin1-name.txt"] = "bad file name"
    (data / "junk").mkdir()
    write_truncated_pdf(data / "junk" / "truncated.pdf", manual)
    (data / "junk" / "fake.pdf").write_text("not really a PDF\n")
    write_encrypted_pdf(data / "junk" / "encrypted.pdf", manual)
    write_drawing_only_pdf(data / "junk" / "image-only.pdf")
    (data / "junk" / "random.txt").write_bytes(random.Random(2).randbytes(20_000))
    (data / "junk" / "empty.markdown").write_bytes(b"")
    (data / "junk" / "binary.md").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(2000))
    bad |= {
        "junk/truncated.pdf": "corrupt PDF",
        "junk/fake.pdf": "not a PDF",
        "junk/encrypted.pdf": "encrypted PDF",
        "junk/image-only.pdf": "no text layer",
        "junk/random.txt": "binary content",
        "junk/empty.markdown": "empty file",
        "junk/binary.md": "binary content",
    }
    return data, good, bad


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root, dirs, files in os.walk(folder):  # does not follow links
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_a_hostile_folder_is_read_safely(tmp_path, monkeypatch):
    data, good, bad = build_hostile(tmp_path)
    if os.geteuid() == 0:  # root reads anything: simulate the permission error where the file is opened
        real_open = open

        def guarded_open(file, *args, **kwargs):
            if Path(file).name == "locked.txt":
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(readers, "open", guarded_open, raising=False)
    else:
        (data / "locked.txt").chmod(0)
    before = _tree(data)

    summary = run(build_config({"run_dir": "run", "data": {"dir": "data", "chunk_tokens": 256}}, tmp_path))

    report = json.loads((tmp_path / "run" / "ingest_report.json").read_text(encoding="utf-8"))
    status = {f["path"]: f for f in report["files"]}
    for path, reason in bad.items():
        assert status[path]["status"] == "skipped", (path, status[path])
        assert status[path]["reason"] == reason, (path, status[path])
    for path in good:
        assert status[path]["status"] == "ok", (path, status[path])
    assert set(status) == set(good) | set(bad)
    chunks = read_jsonl(tmp_path / "run" / "chunks.jsonl")
    text = {doc: " ".join(c["text"] for c in chunks if c["doc"] == doc) for doc in good}
    for path, phrase in good.items():
        assert phrase in text[path], path
    assert all(c["n_tokens"] <= 256 for c in chunks)
    assert not any(SECRET in c["text"] for c in chunks)
    assert _tree(data) == before  # nothing written, nothing touched
    assert dict(summary.rows)["documents read"] == len(good)


BIG_RUN = """
import json, resource, sys, time
from pathlib import Path
from doctune.config import build_config
from doctune.ingest.stage import run

def peak_rss_mb():
    # VmHWM restarts at exec; ru_maxrss would also count the (large) pytest process this one was forked from
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

tmp = Path(sys.argv[1])
t0 = time.perf_counter()
summary = run(build_config({"run_dir": "run", "data": {"dir": "data"}}, tmp))
print(json.dumps({"rows": dict(summary.rows), "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}))
"""


@pytest.mark.slow
def test_a_100_mb_text_file_is_chunked_in_bounded_memory(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    block = "\n\n".join(paragraphs(400, seed=11, sentences=6)) + "\n\n"
    size = 100 * 1024 * 1024
    with open(data / "big.txt", "w", encoding="utf-8") as f:
        written = section = 0
        while written < size:
            part = f"Section {section}.\n\n{block}"
            f.write(part)
            written += len(part)
            section += 1
    script = textwrap.dedent(BIG_RUN)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(
            f"\n[ingest 100 MB text] peak RSS {result['peak_rss_mb']:.0f} MB, {result['seconds']:.1f} s, "
            f"{result['rows']['chunks']} chunks"
        )
    assert result["peak_rss_mb"] < 200  # the text alone would be 100 MB as bytes and again as str
    report = json.loads((tmp_path / "run" / "ingest_report.json").read_text())
    assert report["files"][0]["chars"] == written  # every character read (ASCII text: chars == bytes)
    assert report["files"][0]["chunks"] == result["rows"]["chunks"] > written // (1024 * 4)
    with open(tmp_path / "run" / "chunks.jsonl", "rb") as f:
        f.seek(-100_000, os.SEEK_END)
        last = json.loads(f.read().splitlines()[-1])
    assert last["char_end"] == written - 2  # the text's last paragraph, without its trailing blank line
