"""The CLI against a hostile ranker or a booby-trapped folder (issue 11's
client-side findings): the HTML report reads no file outside the query and
gallery folders; text from a service is escaped when printed; --out and
--html on one path are refused before any work; symlinks out of a folder are
not followed unless asked; results files are written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import grpc
import pytest

from clients import RankerClient
from clients.cli import commands, demo, main, output, report
from clients.files import list_images
from clients.types import Failure, Match
from imagesearch.v1 import ranker_pb2
from tests.test_clients import FakeEmbedder, FakeRanker, start

CONTROL = ("\x1b", "\x07", "\r", "\x9b", "\u202e")


class StatsRanker(FakeRanker):
    """FakeRanker plus the GetStats that `index` asks first (no collections yet)."""

    def GetStats(self, request, context):
        return ranker_pb2.GetStatsResponse(max_top_k=1000)


def services(grpc_server) -> tuple[list[str], StatsRanker]:
    ranker = StatsRanker()
    address = start(grpc_server, FakeEmbedder(), ranker)
    return ["--embedder", address, "--ranker", address, "--connect-timeout", "5"], ranker


# ---------------------------------------------------------------- the HTML report


def test_report_reads_no_file_outside_its_folders(tmp_path):
    photos = demo.find_photos()[:3]
    gallery, query, private = tmp_path / "g", tmp_path / "q", tmp_path / "private"
    for folder in (gallery, query, private):
        folder.mkdir()
    shutil.copy(photos[0], gallery / "a.png")
    shutil.copy(photos[1], query / "q.png")
    secret = private / "secret.png"
    shutil.copy(photos[2], secret)
    (gallery / "link.png").symlink_to(secret)
    names = ["a.png", "../private/secret.png", str(secret), "link.png", "sub/../a.png"]
    text = report.render("t", [("q.png", [Match(i + 1, n, 0.5) for i, n in enumerate(names)])],
                         query_root=query, gallery_root=gallery)
    secret_uri = report.thumbnail_data_uri(secret)
    assert secret_uri and secret_uri not in text
    # the query, a.png and sub/../a.png (inside the gallery) have thumbnails; the three ways out do not
    assert text.count("data:image/jpeg;base64,") == 3
    assert text.count(report.thumbnail_data_uri(gallery / "a.png")) == 2


# ---------------------------------------------------------------- server text on the terminal


def assert_escaped(text: str) -> None:
    for ch in CONTROL:
        assert ch not in text, f"{ch!r} printed raw: {text!r}"


def test_search_escapes_names_from_the_ranker(grpc_server, tmp_path, capsys):
    flags, _ = services(grpc_server)
    evil = "x.jpg\x1b]0;pwned\x07\r   1   1.0000  forged.jpg\x9b2J\u202egpj.exe"
    with RankerClient(flags[3]) as rank:
        rank.upsert("c", [(evil, [1.0, 2.0, 3.0, 4.0])], fingerprint="fp")
    image = tmp_path / "q.png"
    image.write_bytes(b"abcd")
    assert main(["search", str(image), *flags, "--collection", "c"]) == 0
    out = capsys.readouterr().out
    assert_escaped(out)
    assert "x.jpg\\x1b]0;pwned\\x07\\r   1   1.0000  forged.jpg\\x9b2J\\u202egpj.exe" in out
    assert len(out.splitlines()) == 1
    assert main(["search", str(image), *flags, "--collection", "c", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == evil  # JSON escapes them its own way


def test_error_messages_escape_what_the_service_said(grpc_server, tmp_path, capsys):
    flags, _ = services(grpc_server)
    image = tmp_path / "\x1b[2Kbad\r.png"
    image.write_bytes(b"bad")  # the fake embedder's "not an image", whose message quotes the name
    assert main(["search", str(image), *flags]) == 2
    err = capsys.readouterr().err
    assert_escaped(err)
    assert "\\x1b[2Kbad\\r.png: not an image" in err


def test_failure_lists_escape_names_and_reasons(capsys):
    name = "a\x1b[2J.jpg"
    output.print_failures("not indexed", {name: Failure(name, grpc.StatusCode.INVALID_ARGUMENT, "bad\rOK \u202e")},
                          [("b\x07.txt", "not an image (extension)")])
    err = capsys.readouterr().err
    assert_escaped(err)
    assert "a\\x1b[2J.jpg: INVALID_ARGUMENT: bad\\rOK \\u202e" in err and "b\\x07.txt" in err


def test_query_json_on_the_terminal_escapes_what_json_leaves_raw():
    data = {"q.jpg": ["é.jpg", "a\x9b2J\x7f\u202e.jpg"]}
    text = output.json_text(data)
    assert_escaped(text)
    assert json.loads(text) == data and "é.jpg" in text


# ---------------------------------------------------------------- --out and --html


@pytest.mark.parametrize("command", [
    ["run", "--gallery", "{g}", "--query", "{q}", "--out", "{t}/r.html"],  # the report's default name
    ["run", "--gallery", "{g}", "--query", "{q}", "--out", "{t}/r.json", "--html", "{t}/r.json"],
    ["query", "{q}", "--out", "{t}/r.json", "--html", "{t}/sub/../r.json"],
])
def test_out_and_html_on_one_path_are_refused_before_any_work(tmp_path, capsys, command):
    for folder in ("g", "q", "sub"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(b"abcd")
    argv = [a.format(g=tmp_path / "g", q=tmp_path / "q", t=tmp_path) for a in command]
    # Unreachable services: without the check this would fail later, with exit 1.
    assert main([*argv, "--embedder", "127.0.0.1:1", "--ranker", "127.0.0.1:2", "--connect-timeout", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out and --html name the same file") and err.count("\n") == 1, err
    assert not list(tmp_path.glob("r.*"))


# ---------------------------------------------------------------- symlinks out of a folder


def test_index_does_not_follow_symlinks_out_of_the_folder_unless_asked(grpc_server, tmp_path, capsys):
    gallery, private = tmp_path / "g", tmp_path / "private"
    gallery.mkdir()
    (private / "more").mkdir(parents=True)
    (gallery / "a.png").write_bytes(b"abcd")
    (gallery / "in.png").symlink_to(gallery / "a.png")       # inside: indexed
    (private / "secret.png").write_bytes(b"secret")
    (private / "more" / "secret2.png").write_bytes(b"secret2")
    (gallery / "out.png").symlink_to(private / "secret.png")  # a file out
    (gallery / "outdir").symlink_to(private / "more")         # a folder out
    (gallery / "loop").symlink_to(gallery)                    # back to itself
    flags, ranker = services(grpc_server)

    assert main(["index", str(gallery), *flags, "--no-progress"]) == 0
    assert sorted(ranker.items) == ["a.png", "in.png"]
    err = capsys.readouterr().err
    assert "2 symlinks out of the folder skipped (--follow-symlinks includes them): out.png, outdir" in err

    assert main(["index", str(gallery), *flags, "--no-progress", "--follow-symlinks"]) == 0
    assert sorted(ranker.items) == ["a.png", "in.png", "out.png", "outdir/secret2.png"]


def test_following_symlinks_never_loops(tmp_path):
    (tmp_path / "g" / "sub").mkdir(parents=True)
    (tmp_path / "g" / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "g" / "sub" / "up").symlink_to(tmp_path / "g")
    (tmp_path / "g" / "self").symlink_to(tmp_path / "g" / "sub")
    listing = list_images(tmp_path / "g", follow_symlinks=True)
    assert [name for name, _ in listing.images] in (["self/a.png"], ["sub/a.png"])


# ---------------------------------------------------------------- results files


def test_results_files_are_written_atomically(tmp_path, monkeypatch):
    """A unique temporary name (a planted `r.json.tmp` symlink is not written
    through) and fsync before the rename."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "r.json.tmp").symlink_to(victim)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    commands._write(tmp_path / "r.json", '{"q": ["a"]}\n')
    assert victim.read_text() == "keep"
    assert json.loads((tmp_path / "r.json").read_text()) == {"q": ["a"]}
    assert synced
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["r.json", "r.json.tmp", "victim.txt"]
