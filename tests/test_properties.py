"""Property-based tests (hypothesis): metadata parsing, caption cleaning, JSONL resume, the feature store round trip."""

from __future__ import annotations

import json
import tempfile
import unicodedata
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from audit.imagefolder import (MAX_CAPTION_CHARS, STATUSES, clean_caption, parse_metadata_line, read_imagefolder)
from audit.report.jsonl import JsonlWriter, read_jsonl, to_jsonable

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text of every kind: control characters, lone surrogates, combining marks, odd whitespace.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
long_text = st.text(st.sampled_from("ab é\u0301\t\n\x00 \u00a0\u3000"), min_size=MAX_CAPTION_CHARS - 5,
                    max_size=MAX_CAPTION_CHARS + 40)
json_scalar = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


# ---------------------------------------------------------------------------------------------------- captions

@FAST
@given(any_text | long_text)
def test_clean_caption_output_is_clean_bounded_and_stable(text):
    caption, warns = clean_caption(text, "w")
    if caption is None:
        assert not "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cs")).split()
        return
    assert caption == caption.strip() and "  " not in caption and caption
    assert len(caption) <= MAX_CAPTION_CHARS
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in caption)
    assert all(not ch.isspace() or ch == " " for ch in caption)
    caption.encode("utf-8")  # always storable in HDF5 / JSON files
    assert clean_caption(caption, "w") == (caption, [])  # idempotent, and a clean caption raises no warning
    assert bool(warns) == (len(" ".join(unicodedata.normalize("NFC", "".join(
        " " if unicodedata.category(ch) == "Cc" else ch for ch in text if unicodedata.category(ch) != "Cs")).split()))
        > MAX_CAPTION_CHARS)


@FAST
@given(st.text(st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=50))
def test_clean_caption_keeps_ordinary_text(text):
    assume(not any(ch.isspace() for ch in text))
    assert clean_caption(text, "w") == (unicodedata.normalize("NFC", text), [])


# ---------------------------------------------------------------------------------------------------- metadata

@FAST
@given(st.binary(max_size=200))
def test_metadata_parser_never_raises_on_bytes(line):
    parsed = parse_metadata_line(line, 3, "m:3")
    if parsed is None:
        assert not line.strip()
        return
    if parsed.record is None:
        assert parsed.error.startswith("m:3: ") and "\n" not in parsed.error
    else:
        assert isinstance(parsed.record, dict) and isinstance(parsed.name, str)


names = st.text(st.sampled_from("ab./_-é \\"), min_size=1, max_size=12)


@FAST
@given(name=names, rest=st.dictionaries(st.sampled_from(["text", "member", "x"]), json_value, max_size=3))
def test_valid_lines_parse_to_their_record_and_a_normalised_name(name, rest):
    assume(name.strip())
    record = {"file_name": name, **rest}
    for ensure_ascii in (True, False):
        parsed = parse_metadata_line(json.dumps(record, ensure_ascii=ensure_ascii).encode("utf-8"), 1, "m:1")
        assert parsed.record == record and parsed.error is None
        assert parsed.name == Path(parsed.name).as_posix() and "//" not in parsed.name
        assert not parsed.name.startswith("./") and "/./" not in parsed.name
        if "/" not in name and "\\" not in name and name not in (".", "..") and not name.startswith(" "):
            assert parsed.name == name or parsed.name == name.rstrip("/")


@FAST
@given(name=st.text(st.sampled_from("abc_-é"), min_size=1, max_size=10), caption=st.text(max_size=30),
       cut=st.integers(0, 200))
def test_a_torn_line_is_an_error_and_keeps_its_file_name_when_complete(name, caption, cut):
    line = json.dumps({"file_name": name, "text": caption}).encode("utf-8")
    assume(cut < len(line) - 1)
    torn = line[:cut]
    parsed = parse_metadata_line(torn, 9, "m:9")
    if not torn.strip():
        assert parsed is None
        return
    assert parsed.record is None and parsed.error.startswith("m:9: ")
    name_end = len(json.dumps({"file_name": name})) - 1  # the closing quote of the name
    if cut >= name_end:
        assert parsed.name == name


records = st.lists(
    st.one_of(
        st.fixed_dictionaries({"file_name": st.sampled_from(["a.png", "./a.png", "b.png", "sub/c.png", "../d.png",
                                                             "/abs.png", "", "e.txt"])},
                              optional={"text": json_value, "member": json_value}),
        json_value,
    ),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(records, st.booleans(), st.booleans())
def test_any_metadata_gives_one_explained_row_per_name(recs, require_member, require_caption):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "b.png").write_bytes(b"not decoded at this stage")
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
        rows = read_imagefolder(folder, require_member=require_member, require_caption=require_caption)
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)) and ids == sorted(ids) and "b.png" in ids
    for row in rows:
        assert row.status in STATUSES
        assert row.ok == (row.error is None)
        if not row.ok:
            assert "\n" not in row.error and (Path(row.id).name in row.error or "metadata.jsonl:" in row.error)
        if row.ok:
            assert row.id == "b.png" and isinstance(row.caption, (str, type(None)))
            assert row.member in (True, False, None) and not (require_member and row.member is None)


# ---------------------------------------------------------------------------------------------------- JSONL

@FAST
@given(st.lists(st.dictionaries(st.text(max_size=5), json_value | st.floats() | any_text, max_size=4), min_size=1,
                max_size=6), st.data())
def test_jsonl_survives_any_cut_and_resumes_without_loss_or_duplicates(rows, data):
    rows = [{**r, "id": str(i)} for i, r in enumerate(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        with JsonlWriter(path, key="id", fsync=False) as w:
            w.write_all(rows)
        full = path.read_bytes()
        cut = data.draw(st.integers(0, len(full)))
        path.write_bytes(full[:cut])  # a kill at any byte
        with JsonlWriter(path, resume=True, key="id", fsync=False) as w:
            assert w.done == {str(i) for i in range(len(w.done))}  # a prefix of the rows, nothing torn
            w.write_all(r for r in rows if r["id"] not in w)
        back, _ = read_jsonl(path)
    assert back == [json.loads(json.dumps(to_jsonable(r))) for r in rows]


def _lines(draw_records):
    return b"".join(json.dumps(r).encode() + b"\n" for r in draw_records)


# Files that may or may not be results: JSON lines with or without "id", other JSON, text, bytes, a cut anywhere.
maybe_results = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda recs, tail: _lines(recs) + tail,
              st.lists(st.dictionaries(st.sampled_from(["id", "file_name", "text", "x"]), json_scalar, max_size=3),
                       max_size=4),
              st.binary(max_size=40) | st.sampled_from([b"", b"{", b'{"', b'{"id": "a', b"[1, 2]", b"<html>"])))


@FAST
@given(maybe_results)
def test_resume_refuses_any_file_that_is_not_results_unchanged_or_cuts_only_a_torn_record(content):
    """--resume on any file: either it is refused with its bytes unchanged, or what it keeps is whole records
    that all carry the key and what it cuts is the start of a JSON object (a kill's trace)."""
    from audit.errors import ArtifactError

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        path.write_bytes(content)
        try:
            with JsonlWriter(path, resume=True, key="id", fsync=False) as w:
                done = set(w.done)
        except ArtifactError:
            assert path.read_bytes() == content
            return
        kept = path.read_bytes()
    assert content.startswith(kept)
    records = [json.loads(line) for line in kept.splitlines() if line.strip()]
    assert all(isinstance(r, dict) and "id" in r for r in records)
    assert done == {str(r["id"]) for r in records}
    cut = content[len(kept):]
    assert not cut or cut.startswith(b'{"') or b'{"'.startswith(cut)


# ---------------------------------------------------------------------------------------------------- feature store

# h5py refuses strings holding NUL ("VLEN strings do not support embedded NULLs"); NUL cannot reach the store: file
# names cannot hold it, metadata file_names with it are refused and clean_caption drops it. Lone surrogates cannot
# be UTF-8 and are equally kept out upstream (the reader escapes such file names, clean_caption drops them).
store_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)


@st.composite
def store_batches(draw):
    """Appends of random sizes with arbitrary (UTF-8-encodable) strings and arbitrary finite/infinite floats."""
    import numpy as np

    from audit.features.store import empty_batch

    g, p, d = draw(st.integers(1, 3)), 8, draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    batches, start = [], 0
    for n in sizes:
        b = empty_batch(n, g, p, d)
        for i in range(n):
            b["ids"][i] = f"{start + i:04d}/" + draw(store_text)
            b["status"][i] = draw(st.sampled_from(STATUSES))
            for key in ("error", "caption", "caption_source"):
                b[key][i] = draw(store_text)
            b["gen_captions"][i] = [draw(store_text) for _ in range(g)]
        b["member"][:] = rng.integers(-1, 2, n)
        b["query_pixels"][:] = rng.integers(0, 256, b["query_pixels"].shape)
        b["gen_pixels"][:] = rng.integers(0, 256, b["gen_pixels"].shape)
        for key in ("query_img_emb", "gen_img_emb", "caption_emb", "gen_caption_emb"):
            b[key][:] = rng.choice([0.0, -0.0, 1e-30, 3.4e38, np.inf, -np.inf, np.nan, 0.5], b[key].shape)
            b[key][:] += rng.standard_normal(b[key].shape).astype(np.float32) * (rng.random() < 0.5)
        batches.append(b)
        start += n
    return (g, p, d), batches


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(store_batches(), st.integers(1, 6))
def test_feature_store_round_trip(spec, chunk_rows):
    import numpy as np

    from audit.features.store import KEYS, FeatureStore, FeatureWriter
    from audit.manifest import make_manifest

    (g, p, d), batches = spec
    n = sum(len(b["ids"]) for b in batches)
    manifest = make_manifest("features", {"n_gen": g}, {"name": "t", "hash": "h"}, n_rows=n,
                             embedder={"name": "e", "hash": "e"}, captioner={"name": "c", "hash": "c"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.h5"
        writer = FeatureWriter.create(path, manifest, g, p, d, chunk_rows=chunk_rows)
        for b in batches:
            writer.append(b)
        store = FeatureStore.open(path)
        everything, ok = store.read(ok_only=False), store.read(ok_only=True)
    assert store.complete and store.manifest == manifest
    for key in KEYS:
        want = np.concatenate([b[key] for b in batches])
        if want.dtype == object:
            assert everything[key].tolist() == want.tolist(), key
        else:
            np.testing.assert_array_equal(everything[key], want, err_msg=key)  # NaN == NaN here, bit for bit
    keep = everything["status"] == "ok"
    assert ok["ids"].tolist() == everything["ids"][keep].tolist()
