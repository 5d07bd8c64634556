"""Tests for smolattn.pope; expected values below were worked out by hand."""
from pathlib import Path

import pytest

from smolattn import pope
from smolattn.pope import PopeInputError, load_questions, score, score_answers

DATA = Path(__file__).resolve().parent.parent / "samples" / "pope"   # the official files + a derived subset

# answer -> (official, lmms_eval, vlmevalkit)
PARSE_CASES = {
    "Yes": ("yes", "yes", "yes"),
    "yes": ("yes", "yes", "yes"),
    "Yes.": ("yes", None, "yes"),
    "No.": ("no", None, "no"),
    "NO": ("yes", "no", "no"),  # official is case-sensitive
    "no": ("no", "no", "no"),
    "Yes, there is a dog.": ("yes", None, "yes"),
    "There is no dog.": ("no", None, "no"),
    "": ("yes", None, None),  # official: empty counts as yes
    "not sure": ("no", None, None),
    "I don't know": ("yes", None, None),
    "Yes and no": ("no", None, None),
}


@pytest.mark.parametrize("answer", list(PARSE_CASES))
def test_parsers(answer):
    got = tuple(pope.PARSERS[c](answer) for c in ("official", "lmms_eval", "vlmevalkit"))
    assert got == PARSE_CASES[answer]


# (label, answer); parsed as official / lmms_eval / vlmevalkit in the comments
PAIRS = [
    ("yes", "Yes"),              # yes  yes  yes
    ("yes", "Yes."),             # yes  None yes
    ("yes", "No"),               # no   no   no
    ("yes", ""),                 # yes  None None
    ("yes", "NO"),               # yes  no   no
    ("no", "no"),                # no   no   no
    ("no", "Yes"),               # yes  yes  yes
    ("no", "There is no cat."),  # no   None no
    ("no", "Yes and no"),        # no   None None
    ("no", "yes, there is"),     # yes  None yes
]

EXPECTED = {
    # TP 1,2,4,5; FN 3; TN 6,8,9; FP 7,10. P=4/6, R=4/5, F1=8/11; 6 yes preds.
    "official": dict(tp=4, fp=2, tn=3, fn=1, unparseable=0, total=10, accuracy=0.7,
                     precision=2 / 3, recall=0.8, f1=8 / 11, yes_ratio=0.6),
    # None (2,4,8,9,10) excluded; TP 1; FN 3,5; TN 6; FP 7. P=1/2, R=1/3, F1=2/5; yes-ratio from labels.
    "lmms_eval": dict(tp=1, fp=1, tn=1, fn=2, unparseable=5, total=10, accuracy=0.2,
                      precision=0.5, recall=1 / 3, f1=0.4, yes_ratio=0.5),
    # TP 1,2; FN 3,5 + Unknown 4 (label yes); TN 6,8; FP 7,10; Unknown 9 (label no) not a TN.
    # Correct 1,2,6,8. P=2/4, R=2/5, F1=4/9; 4 yes preds.
    "vlmevalkit": dict(tp=2, fp=2, tn=2, fn=3, unparseable=2, total=10, accuracy=0.4,
                       precision=0.5, recall=0.4, f1=4 / 9, yes_ratio=0.4),
}


@pytest.mark.parametrize("conv", list(EXPECTED))
def test_score_crafted(conv):
    labels = [l for l, _ in PAIRS]
    preds = [pope.PARSERS[conv](a) for _, a in PAIRS]
    got = score(labels, preds, conv)
    assert set(got) == set(EXPECTED[conv])
    for k, v in EXPECTED[conv].items():
        assert got[k] == pytest.approx(v), k
        assert type(got[k]) is (float if isinstance(v, float) else int), k


@pytest.mark.parametrize("conv", list(EXPECTED))
def test_score_zero_denominators(conv):
    got = score(["yes", "no"], ["no", "no"], conv)
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (0, 0, 1, 1)
    assert got["precision"] == got["recall"] == got["f1"] == 0.0
    assert got["accuracy"] == 0.5
    empty = score([], [], conv)
    assert empty["total"] == 0
    assert all(empty[m] == 0.0 for m in pope.METRICS)


def test_score_rejects_bad_input():
    with pytest.raises(ValueError):
        score(["yes"], ["yes"], "nope")
    with pytest.raises(ValueError):
        score(["yes"], [], "official")


def test_score_answers_and_markdown():
    rows = [{"split": "custom", "label": "yes", "raw_answer": "No"}]
    rows += [{"split": "popular", "label": "yes", "raw_answer": "Yes"},
             {"split": "popular", "label": "no", "raw_answer": "No"}]
    rows += [{"split": "random", "label": l, "raw_answer": a} for l, a in PAIRS]
    res = score_answers(rows)
    assert list(res["conventions"]) == ["official", "lmms_eval", "vlmevalkit"]
    off = res["conventions"]["official"]
    assert list(off["splits"]) == ["random", "popular", "custom"]
    assert off["splits"]["random"]["accuracy"] == pytest.approx(0.7)
    assert off["splits"]["popular"]["accuracy"] == 1.0
    assert off["splits"]["custom"]["fn"] == 1
    # mean over splits: (0.7 + 1 + 0) / 3 ; all rows pooled: 9 correct of 13
    assert off["mean"]["accuracy"] == pytest.approx(1.7 / 3)
    assert off["all"]["accuracy"] == pytest.approx(9 / 13)
    assert off["all"]["total"] == 13
    assert set(off["mean"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}

    md = pope.markdown_table(res, ["- model: test-model", "- prompt suffix: none"])
    assert md.startswith("- model: test-model")
    for conv in ("official", "lmms_eval", "vlmevalkit"):
        assert conv in md
    assert md.count("| mean |") == 3
    assert "| random | 10 | 4 | 2 | 3 | 1 | 0 | 0.7000 | 0.6667 | 0.8000 | 0.7273 | 0.6000 |" in md


def test_object_of():
    assert pope.object_of("Is there a dining table in the image?") == "dining table"
    assert pope.object_of("Is there an apple in the image?") == "apple"
    assert pope.object_of("Is there a hot dog in the image?") == "hot dog"
    assert pope.object_of("is there a skis in the image") == "skis"
    assert pope.object_of("Are there any cats in this picture?") == "cats"


def test_suffix_constants():
    assert pope.DEFAULT_SUFFIX == pope.SUFFIX_LMMS_EVAL == "\nAnswer the question using a single word or phrase."


def test_load_subset_file():
    qs = load_questions([DATA / "pope_subset_random.json"])
    assert len(qs) == 18
    assert {q.split for q in qs} == {"random"}
    assert sum(q.label == "yes" for q in qs) == 9
    assert qs[0] == pope.Question("random", 13, "COCO_val2014_000000429109.jpg",
                                  "Is there a person in the image?", "yes")
    assert qs[0].key == ("random", 13)


def test_load_folder_picks_official_files():
    qs = load_questions([DATA])
    assert len(qs) == 9000
    assert [q.split for q in qs[::3000]] == ["random", "popular", "adversarial"]
    assert [q.split for q in qs] == ["random"] * 3000 + ["popular"] * 3000 + ["adversarial"] * 3000
    src = pope.describe_sources([DATA])
    assert [Path(s["path"]).name for s in src] == [
        "coco_pope_random.json", "coco_pope_popular.json", "coco_pope_adversarial.json"]
    assert all(s["questions"] == 3000 for s in src)
    known = dict(reversed(line.split()) for line in (DATA.parent / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert [s["sha256"] for s in src] == [known[f"pope/coco_pope_{s}.json"] for s in ("random", "popular", "adversarial")]
    assert src[0]["sha256"] == "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994"   # the official file


def test_load_category_file():
    qs = load_questions([DATA / "pope_subset.jsonl"])
    assert len(qs) == 54
    assert [q.split for q in qs] == ["random"] * 18 + ["popular"] * 18 + ["adversarial"] * 18


def test_folder_fallback_and_stem_split(tmp_path):
    line = '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "Yes"}\n'
    (tmp_path / "x_popular.jsonl").write_text(line)
    (tmp_path / "x_random.json").write_text(line)
    (tmp_path / "notes.txt").write_text("ignore me")
    qs = load_questions([tmp_path])
    assert [q.split for q in qs] == ["random", "popular"]
    assert qs[0].label == "yes"
    (tmp_path / "mine.jsonl").write_text("\n" + line + "\n")
    assert [q.key for q in load_questions([tmp_path / "mine.jsonl"])] == [("mine", 1)]


def _write(tmp_path, lines, name="q_random.json"):
    p = tmp_path / name
    p.write_text("".join(l + "\n" for l in lines))
    return p


GOOD = '{"question_id": %d, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}'


@pytest.mark.parametrize("bad_line, needle", [
    ('{"question_id": 3, "image": "a.jpg", "text": "t"', "invalid JSON"),
    ('{"question_id": 3, "image": "a.jpg", "text": "t"}', "label"),
    ('{"question_id": 3, "image": "a.jpg", "text": "t", "label": "maybe"}', "maybe"),
    (GOOD % 1, "duplicate"),
])
def test_malformed_line(tmp_path, bad_line, needle):
    p = _write(tmp_path, [GOOD % 1, GOOD % 2, bad_line])
    with pytest.raises(PopeInputError) as e:
        load_questions([p])
    msg = str(e.value)
    assert f"{p}:3:" in msg and needle in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(PopeInputError, match="no such file"):
        load_questions([tmp_path / "absent.json"])
