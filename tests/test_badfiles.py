"""A folder mixing ~45 kinds of bad and hostile input with good images: every good row loads, every bad row is
explained, nothing outside the folder is read, no special file blocks, and `check`, `scan`, `features` and
`report` through the CLI runner end with a row status or a one-line error, losing no file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

from audit.cli import app
from audit.imagefolder import ImageError, check_image_shape, load_image, load_row_image, read_imagefolder
from badcorpus import SECRET, chunk_bomb_png, png_with_header_only, strip_png, write_bad_corpus

ENV_SECRET = "AUDIT_TEST_ENV_SECRET"  # its value must never appear in an output (a caption -> /proc/self/environ)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a FIFO opened for reading blocks until a writer comes, which never happens."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s (blocked on a special file?)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcorpus")
    expect, warned = write_bad_corpus(root / "data", root / "outside")
    with deadline(30):
        rows = read_imagefolder(root / "data")
        images = {r.id: load_row_image(r) for r in rows}
    return root / "data", expect, warned, rows, images


def test_every_row_gets_its_expected_status(corpus):
    _, expect, _, rows, _ = corpus
    got = {r.id: r.status for r in rows}
    assert got == expect
    assert len(rows) == len(got), "row ids must be unique"
    assert len(expect) >= 40 and len(set(expect.values()) - {"ok"}) >= 7


def test_good_rows_decode_to_rgb_and_bad_rows_to_nothing(corpus):
    _, _, _, rows, images = corpus
    for row in rows:
        img = images[row.id]
        if row.ok:
            assert img is not None and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, row.id
            assert row.error is None
        else:
            assert img is None, row.id


def test_every_bad_row_has_one_line_error_naming_its_file(corpus):
    folder, _, _, rows, _ = corpus
    for row in (r for r in rows if not r.ok):
        assert row.error and "\n" not in row.error, row.id
        # The image, its .txt caption, or the metadata line at fault.
        named = Path(row.id).stem if not row.id.startswith("metadata.jsonl:") else row.id
        assert named in row.error or f"{folder}/metadata.jsonl:" in row.error, (row.id, row.error)


def test_warnings_for_truncated_and_empty_captions(corpus):
    _, _, warned, rows, _ = corpus
    by_id = {r.id: r for r in rows}
    for rid in warned:
        assert by_id[rid].warnings, rid
    assert len(by_id["long_caption.png"].caption) <= 2000
    assert by_id["empty_caption.png"].caption is None
    assert by_id["control_chars.png"].caption == "tab here null [31m and a lone"
    assert by_id["good.jpg"].caption_source == "txt" and by_id["good.png"].caption_source == "metadata"


def test_hidden_files_and_symlinked_folders_are_not_rows(corpus):
    _, _, _, rows, _ = corpus
    ids = {r.id for r in rows}
    assert ".hidden.png" not in ids and not any(i.startswith(".cache") for i in ids)
    assert not any(i.startswith("escape_dir/") for i in ids)


def test_unusual_but_valid_images_keep_their_content(corpus):
    _, _, _, _, images = corpus
    assert images["rotated_exif.jpg"].shape == (16, 24, 3)  # EXIF orientation applied
    cmyk = images["cmyk.jpg"].reshape(-1, 3).mean(0)
    assert cmyk[1] < cmyk[0] and cmyk[1] < cmyk[2]  # high magenta ink -> little green
    assert images["gray16.png"].max() > 200  # 16-bit scaled down, not clipped to black/white
    assert np.array_equal(images["link_inside.png"], images["good.png"])


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    big = tmp_path / "bomb.png"
    big.write_bytes(png_with_header_only(30_000, 30_000))

    def no_decoding(self):
        raise AssertionError("decoded an image that is above the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as err:
        load_image(big)
    assert err.value.status == "too_large" and "bomb.png" in str(err.value)
    small = tmp_path / "small.png"
    small.write_bytes(png_with_header_only(20, 20))
    with pytest.raises(ImageError, match="above the limit of 100 pixels") as err:
        load_image(small, max_pixels=100)
    assert err.value.status == "too_large"


def test_pixel_limit_allocates_nothing_large(tmp_path):
    """In a fresh process, refusing a 10-gigapixel header must not grow memory (decoding would need 30 GB)."""
    for name, (w, h) in {"a.png": (100_000, 100_000), "b.png": (9000, 9000)}.items():
        (tmp_path / name).write_bytes(png_with_header_only(w, h))
    (tmp_path / "c.png").write_bytes(strip_png(4_000_000, 2))  # decodable: 8 MB; scaled by a model: 448 Gpx
    code = textwrap.dedent(f"""
        import resource, sys
        from audit.imagefolder import ImageError, load_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for name in ("a.png", "b.png", "c.png"):
            try:
                load_image({str(tmp_path)!r} + "/" + name)
                sys.exit("loaded " + name)
            except ImageError as exc:
                assert exc.status == "too_large", exc
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    grown_kib = int(out.stdout.strip())
    assert grown_kib < 50 * 1024, f"refusing grew the process by {grown_kib} KiB"


def test_unreadable_permissions(tmp_path):
    """A file the user may not read gets status unreadable. Root reads anything, so as root the check runs in a
    child process that drops to the unprivileged `nobody` user."""
    folder = Path(tempfile.mkdtemp(prefix="audit-perm-"))
    try:
        os.chmod(folder, 0o755)
        from PIL import Image

        Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "locked.png")
        Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "open.png")
        os.chmod(folder / "locked.png", 0)
        os.chmod(folder / "open.png", 0o644)
        code = textwrap.dedent(f"""
            import os
            from PIL import Image
            from audit.imagefolder import read_imagefolder, load_row_image
            Image.init()  # import the format plugins while the interpreter's own files are still readable
            if os.geteuid() == 0:
                os.setegid(65534); os.seteuid(65534)
            for row in read_imagefolder({str(folder)!r}):
                load_row_image(row)
                print(row.id, row.status, row.error, sep="|")
        """)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                             cwd="/")
        assert out.returncode == 0, out.stderr
        rows = {line.split("|")[0]: line.split("|")[1:] for line in out.stdout.splitlines()}
        assert rows["open.png"][0] == "ok"
        assert rows["locked.png"][0] == "unreadable"
        assert "locked.png: permission denied" in rows["locked.png"][1]
    finally:
        os.chmod(folder / "locked.png", 0o644)
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_scan_of_the_bad_corpus_scores_every_good_row_and_explains_every_bad_one(corpus, tiny_world,
                                                                                  tmp_path_factory, monkeypatch):
    """Through the CLI: every row of the corpus gets its status (the 4,000,000 x 2 strip fails as its own row and
    its batch's other rows are scored), nothing from outside the folder or the environment reaches the results
    or the report, no markup from a caption is live, and --resume passes over every row."""
    from audit.report.jsonl import read_jsonl
    from tinyheads import tiny_heads

    monkeypatch.setenv(ENV_SECRET, SECRET)
    folder, expect, _, _, _ = corpus
    heads = tiny_heads(tiny_world, tmp_path_factory.mktemp("heads"))
    out = tmp_path_factory.mktemp("scan") / "results.jsonl"
    scan = ["scan", str(folder), "--out", str(out), *heads["opts"], "--quiet"]
    with deadline(600):
        result = CliRunner().invoke(app, [*scan, "--report", str(out.with_suffix(".html"))])
    assert result.exit_code == 0, result.output
    results = {r["id"]: r for r in read_jsonl(out)[0]}
    assert set(results) == set(expect)
    for rid, want in expect.items():
        r = results[rid]
        assert r["status"] == want, (rid, r["status"], r["error"])
        if want == "ok":
            assert r["verdict"] in ("member", "non-member", "inconclusive") and 0 <= r["probability"] <= 1, rid
            assert r["error"] is None
        else:
            assert r["verdict"] is None and r["probability"] is None, rid
            assert r["error"] and "\n" not in r["error"], rid
    assert results["no_caption.png"]["caption_source"] == "captioner"  # captioned from the image, and says so
    page = out.with_suffix(".html").read_text()
    assert "Rows that could not be scored" in page and "huge_header.png" in page
    again = out.parent / "again.html"
    result = CliRunner().invoke(app, ["report", str(out), "--out", str(again), "--images", str(folder)])
    assert result.exit_code == 0, result.output
    for text in (out.read_text(), page, again.read_text(), result.output):
        assert SECRET not in text
    for html in (page, again.read_text()):
        assert "<script" not in html and "<img src=x" not in html and "&lt;script&gt;" in html
    before = out.read_bytes()
    with deadline(300):
        result = CliRunner().invoke(app, [*scan, "--resume", "--json"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == before  # the strip and every other refused row are passed over, not retried


@pytest.mark.slow
def test_features_of_a_hostile_folder_keeps_every_row(tiny_world, tmp_path, monkeypatch):
    from audit.features import FeatureStore
    from tinyheads import FEATURES

    monkeypatch.setenv(ENV_SECRET, SECRET)
    made = _hostile_check_inputs(tmp_path)
    folder = tmp_path / "q"
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"good{i}.png")
    listed = [f"good{i}.png" for i in range(3)] + ["strip.png", "fifo.png"]  # captioned: refused for their image
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "text": "a square",
                                                               "member": i % 2 == 0}) + "\n"
                                                   for i, name in enumerate(listed)))
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in FEATURES.items()]
    with deadline(300):
        result = CliRunner().invoke(app, ["features", "--target", str(tiny_world["target"]), "--embedder",
                                          str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"]), "--data",
                                          str(folder), "--out", str(tmp_path / "s.h5"), "--quiet", *opts])
    assert result.exit_code == 0, result.output
    batch = FeatureStore.open(tmp_path / "s.h5").read(ok_only=False)
    status = dict(zip(batch["ids"], batch["status"]))
    assert set(status) == set(made) | {f"good{i}.png" for i in range(3)}
    assert all(status[f"good{i}.png"] == "ok" for i in range(3))
    assert status["strip.png"] == "too_large" and status["fifo.png"] == "unreadable"
    assert status["secret.png"] == status["environ.png"] == "outside_folder"
    assert SECRET not in " ".join(map(str, batch["caption"])) + " ".join(map(str, batch["error"]))


# ------------------------------------------------------------------------------------------------ hostile files

def test_nothing_outside_the_folder_is_read_into_a_row(corpus):
    _, _, _, rows, _ = corpus
    by_id = {r.id: r for r in rows}
    for row in rows:
        assert SECRET not in f"{row.caption} {row.error} {row.warnings}", row.id
    assert by_id["caption_environ.png"].caption is None and "leads outside" in by_id["caption_environ.png"].error
    assert by_id["caption_inside.png"].caption == "a caption read from a .txt file"  # a link inside is followed
    assert "is a FIFO" in by_id["fifo.png"].error and "is a FIFO" in by_id["caption_fifo.png"].error


def test_shape_limits_refuse_before_decoding_from_files_and_from_bytes(tmp_path, monkeypatch):
    (tmp_path / "strip.png").write_bytes(strip_png(4_000_000, 2))

    def no_decoding(self):
        raise AssertionError("decoded an image whose shape is refused")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for data in (None, (tmp_path / "strip.png").read_bytes()):  # a folder's file, or bytes from HTTP / an upload
        with pytest.raises(ImageError, match=r"4000000x2 pixels, an aspect ratio above 32:1") as err:
            load_image(tmp_path / "strip.png", data=data)
        assert err.value.status == "too_large"
    check_image_shape("ok.png", 32 * 7, 7)
    for w, h in ((32 * 7 + 1, 7), (1, 33), (0, 5)):
        with pytest.raises(ImageError):
            check_image_shape("x.png", w, h)


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP", b"iTXt"])
def test_ancillary_chunk_bombs_are_a_row_status_in_bounded_memory(tmp_path, kind):
    (tmp_path / "b.png").write_bytes(chunk_bomb_png(kind))
    with pytest.raises(ImageError, match="too large") as err:
        load_image(tmp_path / "b.png")
    assert err.value.status == "unreadable" and "\n" not in str(err.value)


def _one_error(result, code=1):
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert result.exit_code == code and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _hostile_check_inputs(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text(SECRET)
    q = tmp_path / "q"
    q.mkdir()
    good = strip_png(16, 16)
    made = {}
    for name, caption in (("secret", tmp_path / "outside" / "secret.txt"), ("environ", Path("/proc/self/environ"))):
        (q / f"{name}.png").write_bytes(good)
        os.symlink(caption, q / f"{name}.txt")
        made[f"{name}.png"] = "leads outside"
    (q / "fifo_caption.png").write_bytes(good)
    os.mkfifo(q / "fifo_caption.txt")
    made["fifo_caption.png"] = "fifo_caption.txt: is a FIFO"
    os.mkfifo(q / "fifo.png")
    made["fifo.png"] = "fifo.png: is a FIFO, not an image"
    (q / "strip.png").write_bytes(strip_png(4_000_000, 2))
    made["strip.png"] = "aspect ratio above 32:1"
    return made


def test_check_refuses_hostile_files_and_captions_in_one_line_without_leaking(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SECRET, SECRET)
    for name, reason in _hostile_check_inputs(tmp_path).items():
        with deadline(20):
            result = CliRunner().invoke(app, ["check", str(tmp_path / "q" / name), "--target", "toy"])
        line = _one_error(result)
        assert reason in line, (name, line)
        assert SECRET not in result.output


def _results_line(rid: str) -> str:
    return json.dumps({"id": rid, "image": rid, "status": "ok", "verdict": "non-member", "probability": 0.1}) + "\n"


def test_outputs_that_would_replace_an_input_are_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    results = tmp_path / "r.jsonl"
    results.write_text(_results_line("a.png"))
    (tmp_path / "store.h5").write_bytes(b"not a store, but an input all the same")
    before = {p: p.read_bytes() for p in (results, data / "metadata.jsonl", tmp_path / "store.h5")}
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(results, links / "sym.html")
    os.link(results, links / "hard.html")  # another name of the same inode
    runs = [
        ["report", str(results), "--out", str(links / "sym.html")],
        ["report", str(results), "--out", str(links / "hard.html")],
        ["scan", str(data), "--target", "toy", "--out", str(tmp_path / "new.jsonl"), "--report",
         str(tmp_path / "new.jsonl")],
        ["scan", str(data), "--target", "toy", "--out", str(results), "--report", str(results), "--resume"],
        ["scan", str(data), "--target", "toy", "--out", str(data / "metadata.jsonl"), "--resume"],
        ["report", str(results), "--out", str(results)],
        ["report", str(results), "--out", str(tmp_path / "." / "r.jsonl")],
        ["features", "--target", "toy", "--data", str(data), "--out", str(data / "metadata.jsonl")],
        ["features", "--target", "toy", "--data", str(data), "--out", str(data / "b.png")],
        ["train", str(tmp_path / "store.h5"), "--out", str(tmp_path / "store.h5")],
        ["evaluate", str(tmp_path / "store.h5"), "--json", str(tmp_path / "store.h5")],
    ]
    for args in runs:
        with deadline(30):
            result = CliRunner().invoke(app, args)
        line = _one_error(result, code=2)
        assert "nothing was written" in line, (args, line)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "links", "r.jsonl", "store.h5"]
    assert sorted(p.name for p in data.iterdir()) == ["a.png", "metadata.jsonl"]


@pytest.mark.parametrize("content", [b"hello, not results", b"<html><body>a report</body></html>",
                                     b'{"file_name": "a.png", "text": "metadata, not results"}',
                                     b'{"id": "a.png"}\nplain text cut short', b"\x89PNG\r\n\x1a\n"])
def test_resume_on_a_file_that_is_not_results_refuses_it_unchanged(tmp_path, content):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    out = tmp_path / "out.txt"
    out.write_bytes(content)
    with deadline(30):
        result = CliRunner().invoke(app, ["scan", str(data), "--target", "toy", "--out", str(out), "--resume"])
    line = _one_error(result)
    assert "out.txt" in line and "not a results file" in line
    assert out.read_bytes() == content


def test_report_of_results_through_a_fifo_or_naming_one_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "r.jsonl")
    with deadline(20):
        result = CliRunner().invoke(app, ["report", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "r.html")])
    assert "is a FIFO" in _one_error(result)
    (tmp_path / "ok.jsonl").write_text(_results_line("a.png"))
    os.mkfifo(tmp_path / "out.html")
    with deadline(20):
        result = CliRunner().invoke(app, ["report", str(tmp_path / "ok.jsonl"), "--out", str(tmp_path / "out.html")])
    assert "not a regular file" in _one_error(result, code=2)


@pytest.mark.parametrize("kind", ["fifo", "outside", "directory"])
def test_a_hostile_metadata_file_fails_the_folder_in_one_line_without_blocking(tmp_path, kind):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (tmp_path / "secret.jsonl").write_text(json.dumps({"file_name": "a.png", "text": SECRET}) + "\n")
    {"fifo": lambda p: os.mkfifo(p), "outside": lambda p: os.symlink(tmp_path / "secret.jsonl", p),
     "directory": lambda p: p.mkdir()}[kind](data / "metadata.jsonl")
    from audit.errors import InputError

    with deadline(20), pytest.raises(InputError) as err:  # the CLI prints it as one line, exit code 1
        read_imagefolder(data)
    assert "metadata.jsonl: " in str(err.value) and "\n" not in str(err.value) and SECRET not in str(err.value)
