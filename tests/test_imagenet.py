import re

import numpy as np
import pytest
import torch

from xar_infer.imagenet import (
    IMAGENET_CLASSES,
    IMAGENET_SYNSET_WORDS,
    class_name,
    resolve_class_label,
    resolve_class_labels,
)

# Every name shared by two or more classes, worked out from the WordNet synonym lists.
AMBIGUOUS = {
    "cardigan": (264, 474),
    "catamount": (286, 287),
    "crane": (134, 517),
    "crawfish": (123, 124),
    "crayfish": (123, 124),
    "gong": (494, 577),
    "grass snake": (55, 57),
    "harp": (593, 594),
    "horn": (513, 566),
    "maillot": (638, 639),
    "missile": (657, 744),
    "panda": (387, 388),
    "panther": (286, 290),
    "partridge": (82, 86),
    "polecat": (358, 361),
    "sand viper": (54, 66),
    "sus scrofa": (341, 342),
    "tub": (435, 876),
    "wagon": (436, 734),
}


def test_data_has_one_synonym_line_per_class():
    assert isinstance(IMAGENET_SYNSET_WORDS, tuple)
    assert len(IMAGENET_SYNSET_WORDS) == 1000
    for line in IMAGENET_SYNSET_WORDS:
        assert all(synonym and synonym == synonym.strip() for synonym in line.split(", "))
        assert ",," not in line and not line.endswith(",")


def test_class_list_has_1000_clean_short_names():
    assert isinstance(IMAGENET_CLASSES, tuple)
    assert len(IMAGENET_CLASSES) == 1000
    assert all(name and name == name.strip() and "," not in name for name in IMAGENET_CLASSES)
    assert IMAGENET_CLASSES == tuple(line.split(",")[0] for line in IMAGENET_SYNSET_WORDS)


@pytest.mark.parametrize(
    "index, line",
    [
        (0, "tench, Tinca tinca"),
        (1, "goldfish, Carassius auratus"),
        (134, "crane"),
        (207, "golden retriever"),
        (517, "crane"),
        (639, "maillot, tank suit"),
        (999, "toilet tissue, toilet paper, bathroom tissue"),
    ],
)
def test_synonym_lines_follow_wordnet(index, line):
    assert IMAGENET_SYNSET_WORDS[index] == line


@pytest.mark.parametrize(
    "index, name",
    [(0, "tench"), (1, "goldfish"), (207, "golden retriever"), (999, "toilet tissue"),
     (134, "crane"), (517, "crane")],
)
def test_short_names(index, name):
    assert IMAGENET_CLASSES[index] == name
    assert class_name(index) == name


@pytest.mark.parametrize(
    "text, index",
    [
        ("tench", 0),
        ("Tinca tinca", 0),
        ("tinca TINCA", 0),
        ("TENCH, tinca tinca", 0),
        ("tench, Tinca tinca", 0),
        (" tench ,Tinca   tinca ", 0),
        ("Carassius auratus", 1),
        ("golden retriever", 207),
        ("toilet paper", 999),
        ("Bathroom Tissue", 999),
        ("toilet tissue, toilet paper, bathroom tissue", 999),
        ("tank suit", 639),
        ("maillot, tank suit", 639),
        ("judge's robe", 400),
    ],
)
def test_names_match_whole_line_or_one_synonym(text, index):
    assert resolve_class_label(text) == index


@pytest.mark.parametrize("text", ["Golden Retriever ", "  GOLDEN retriever", "golden retriever\n"])
def test_names_ignore_case_and_surrounding_whitespace(text):
    assert resolve_class_label(text) == 207


def test_partial_lines_do_not_match():
    for text in ["tench, goldfish", "toilet tissue, toilet paper", "tench Tinca tinca"]:
        with pytest.raises(ValueError, match="unknown ImageNet class name"):
            resolve_class_label(text)


@pytest.mark.parametrize("text", ["crane", "Crane", " CRANE "])
def test_crane_is_ambiguous(text):
    with pytest.raises(ValueError) as info:
        resolve_class_label(text)
    message = str(info.value)
    assert "ambiguous" in message
    assert "134 (crane), 517 (crane)" in message
    assert "integer id" in message


def test_ambiguous_message_shows_synonym_lines():
    with pytest.raises(ValueError) as info:
        resolve_class_label("maillot")
    assert "638 (maillot), 639 (maillot, tank suit)" in str(info.value)
    with pytest.raises(ValueError) as info:
        resolve_class_label("cardigan")
    assert "264 (Cardigan, Cardigan Welsh corgi), 474 (cardigan)" in str(info.value)


def test_long_synonym_lines_are_shortened_but_keep_the_asked_name():
    with pytest.raises(ValueError) as info:
        resolve_class_label("wagon")
    message = str(info.value)
    assert "436 (beach wagon, station wagon, wagon, " in message
    assert "734 (police van, police wagon, paddy wagon, patrol wagon, wagon, " in message
    assert "..." in message
    assert "black Maria" not in message


@pytest.mark.parametrize("name, ids", sorted(AMBIGUOUS.items()))
def test_every_shared_name_is_ambiguous(name, ids):
    with pytest.raises(ValueError, match="ambiguous") as info:
        resolve_class_label(name)
    message = str(info.value)
    assert all(f"{i} (" in message for i in ids)


def test_no_other_names_are_ambiguous():
    # Recompute independently from the data: every name naming more than one class.
    owners = {}
    for class_id, line in enumerate(IMAGENET_SYNSET_WORDS):
        for name in {line.lower(), *(s.strip().lower() for s in line.split(","))}:
            owners.setdefault(name, set()).add(class_id)
    shared = {name: tuple(sorted(ids)) for name, ids in owners.items() if len(ids) > 1}
    assert shared == AMBIGUOUS
    unique = [name for name, ids in owners.items() if len(ids) == 1]
    assert len(unique) > 2000
    for name in unique:
        assert resolve_class_label(name) == next(iter(owners[name]))


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError) as info:
        resolve_class_label("golden retreiver")
    message = str(info.value)
    assert "207 (golden retriever)" in message
    assert "integer class id" in message


def test_unknown_name_suggests_close_synonym():
    # "Tinca tinca" is only the second synonym of class 0; a typo of it still finds it.
    with pytest.raises(ValueError) as info:
        resolve_class_label("tinca tnca")
    assert "Did you mean: 0 (tench, Tinca tinca)" in str(info.value)
    with pytest.raises(ValueError) as info:
        resolve_class_label("toilett paper")
    assert "999 (toilet tissue, toilet paper, bathroom tissue)" in str(info.value)


def test_unknown_name_suggests_at_most_five():
    with pytest.raises(ValueError) as info:
        resolve_class_label("terrier")
    suggestions = re.findall(r"\d+ \(", str(info.value).split("Did you mean:")[1])
    assert 1 <= len(suggestions) <= 5


def test_unknown_name_without_close_match_still_explains():
    with pytest.raises(ValueError, match="unknown ImageNet class name 'qqqqzzzz'.*integer"):
        resolve_class_label("qqqqzzzz")


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_name_rejected(empty):
    with pytest.raises(ValueError, match="empty class label"):
        resolve_class_label(empty)


@pytest.mark.parametrize("bad", [1000, 5000, -1, "1000", "-3"])
def test_out_of_range_ids_rejected(bad):
    with pytest.raises(ValueError) as info:
        resolve_class_label(bad)
    message = str(info.value)
    assert str(bad) in message
    assert "0 to 999" in message


def test_range_follows_num_classes():
    assert resolve_class_label(9, num_classes=10) == 9
    with pytest.raises(ValueError, match="0 to 9"):
        resolve_class_label(10, num_classes=10)


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), torch.tensor(False)])
def test_bool_rejected(bad):
    with pytest.raises(TypeError, match="bool"):
        resolve_class_label(bad)


@pytest.mark.parametrize("bad", [3.0, None, b"tench"])
def test_other_types_rejected(bad):
    with pytest.raises(TypeError, match="int id or a class name"):
        resolve_class_label(bad)


def test_digit_strings_are_ids():
    assert resolve_class_label("207") == 207
    assert resolve_class_label(" 0 ") == 0
    assert resolve_class_label("5", num_classes=10) == 5


def test_integer_scalars():
    assert resolve_class_label(np.int64(207)) == 207
    assert resolve_class_label(np.uint8(1)) == 1
    assert resolve_class_label(torch.tensor(999)) == 999


def test_names_need_imagenet_1k():
    with pytest.raises(ValueError, match="only available for ImageNet-1k"):
        resolve_class_label("tench", num_classes=10)
    with pytest.raises(ValueError, match="only available for ImageNet-1k"):
        resolve_class_labels(["tench"], num_classes=21843)
    assert resolve_class_labels([0, 20000], num_classes=21843) == [0, 20000]


@pytest.mark.parametrize("bad", [0, -5, True, 10.0])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        resolve_class_label(0, num_classes=bad)


def test_labels_single_and_sequences():
    assert resolve_class_labels(207) == [207]
    assert resolve_class_labels("tench") == [0]
    assert resolve_class_labels(["goldfish", 207, "999"]) == [1, 207, 999]
    assert resolve_class_labels((3, 3)) == [3, 3]


def test_labels_tensor_and_array():
    assert resolve_class_labels(torch.tensor([0, 207, 999])) == [0, 207, 999]
    assert resolve_class_labels(np.array([1, 2], dtype=np.int32)) == [1, 2]
    assert resolve_class_labels(torch.tensor(5)) == [5]
    assert resolve_class_labels(np.array(["tench", "goldfish"])) == [0, 1]


def test_labels_reject_bad_arrays():
    with pytest.raises(ValueError, match="1-D"):
        resolve_class_labels(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"labels\[0\]"):
        resolve_class_labels(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "empty", [[], (), torch.tensor([], dtype=torch.long), np.array([], dtype=int)]
)
def test_empty_labels_rejected(empty):
    with pytest.raises(ValueError, match="no class labels"):
        resolve_class_labels(empty)


def test_labels_error_names_position():
    with pytest.raises(ValueError, match=r"labels\[1\]: class id 1000 is out of range"):
        resolve_class_labels([5, 1000])


def test_labels_reject_unordered_collections():
    with pytest.raises(TypeError):
        resolve_class_labels({1, 2})


def test_class_name_accepts_integer_scalars():
    assert class_name(np.int64(1)) == "goldfish"
    assert class_name(torch.tensor(999)) == "toilet tissue"


@pytest.mark.parametrize("bad", [1000, -1])
def test_class_name_range(bad):
    with pytest.raises(ValueError, match="0 to 999"):
        class_name(bad)


@pytest.mark.parametrize("bad", [True, "207", "tench", 3.0, None])
def test_class_name_rejects_non_ids(bad):
    with pytest.raises(TypeError):
        class_name(bad)


# ---- labels beyond int64, or beyond what Python will print ----

@pytest.mark.parametrize("label, shown", [
    (10**30, "1000000000000000000000000000000"),
    (np.uint64(2**64 - 1), "18446744073709551615"),
    ("99999999999999999999999", "'99999999999999999999999'"),
    ("9" * 5000, "'" + "9" * 39 + "..."),                         # int() of it is refused by Python
    ("-" + "9" * 5000, "'-" + "9" * 38 + "..."),
    (10**5000, "<an integer of 16610 bits>"),                     # repr() of it is refused by Python
], ids=["1e30", "uint64 max", "23 digits", "5000 digits", "-5000 digits", "int 1e5000"])
def test_labels_beyond_int64_are_out_of_range_and_named(label, shown):
    from xar_infer import InvalidArgumentError

    with pytest.raises(InvalidArgumentError) as info:
        resolve_class_labels([3, label])
    assert str(info.value) == f"labels[1]: class id {shown} is out of range: valid ids are 0 to 999"


def test_a_uint64_array_beyond_int64_is_named():
    from xar_infer import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=r"labels\[0\]: class id 18446744073709551615 is out of range"):
        resolve_class_labels(np.array([2**64 - 1, 1], dtype=np.uint64))


def test_long_digit_strings_with_leading_zeros_are_still_ids():
    assert resolve_class_label("0" * 50 + "7") == 7


def test_huge_names_are_shortened_in_messages():
    from xar_infer import InvalidArgumentError

    with pytest.raises(InvalidArgumentError) as info:
        resolve_class_label("x" * 10_000)
    assert len(str(info.value)) < 300
