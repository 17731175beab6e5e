"""ImageNet-1k class names and conversion of user-given class labels to ids.

Class ``i`` is described by the WordNet synonyms ("synset words") of the i-th ImageNet-1k
synset in sorted synset-id order, the wording that diffusers' DiT pipeline uses in its
``id2label`` (``0: "tench, Tinca tinca"``, ``134: "crane"``, ``517: "crane"``).

The data file ``data/imagenet_synset_words.txt`` has exactly one line per class id and no
header. It was generated offline from the files ``timm/data/_info/imagenet_synsets.txt``
(the 1000 synset ids in class order) and ``timm/data/_info/imagenet_synset_to_lemma.txt``
(synset id, tab, comma-separated WordNet lemmas) of the ``timm`` 1.0.31 wheel: line ``i``
is the lemma list of the i-th synset id.

A class name given by the user matches a class when, ignoring case and extra whitespace,
it equals the class's whole synonym line or any single synonym on it. Names shared by
several classes (``"crane"``: the bird 134 and the machine 517) are rejected with a list
of the candidates; pass the integer id for those.

Example:
    >>> from xar_infer.imagenet import (
    ...     IMAGENET_CLASSES, IMAGENET_SYNSET_WORDS, class_name, resolve_class_labels)
    >>> IMAGENET_CLASSES[0], IMAGENET_SYNSET_WORDS[0]
    ('tench', 'tench, Tinca tinca')
    >>> resolve_class_labels(["Golden Retriever", "Tinca tinca", 1, "999"])
    [207, 0, 1, 999]
    >>> class_name(999)
    'toilet tissue'
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from types import MappingProxyType
from typing import Any

from .errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = [
    "IMAGENET_CLASSES",
    "IMAGENET_SYNSET_WORDS",
    "class_name",
    "resolve_class_label",
    "resolve_class_labels",
]

IMAGENET_NUM_CLASSES = 1000

_DATA_FILE = "imagenet_synset_words.txt"
_INT_STRING = re.compile(r"[+-]?[0-9]+")
# Longest synonym text shown for one class in an error message before it is cut short.
_DESCRIPTION_WIDTH = 60
# A digit string longer than this is no class id of any model (and no int64).
_MAX_ID_DIGITS = 19
# Class ids in error messages: integers of more bits, and texts longer, are abbreviated.
_MAX_SHOWN_BITS = 128
_MAX_SHOWN_CHARS = 40
_MAX_SUGGESTIONS = 5


def _normalize(text: str) -> str:
    """Lookup key: case-folded, each comma-separated part with its whitespace collapsed."""
    return ", ".join(" ".join(part.split()) for part in text.casefold().split(","))


def _load_synset_words() -> tuple[str, ...]:
    path = files("xar_infer") / "data" / _DATA_FILE
    lines = tuple(path.read_text(encoding="utf-8").splitlines())
    # A truncated or mangled data file would silently shift every id, so fail loudly.
    if len(lines) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(
            f"{path} holds {len(lines)} lines, expected one per class ({IMAGENET_NUM_CLASSES})"
        )
    for class_id, line in enumerate(lines):
        if any(not synonym.strip() for synonym in line.split(",")):
            raise RuntimeError(f"{path}: line for class {class_id} has an empty name: {line!r}")
    return lines


IMAGENET_SYNSET_WORDS: tuple[str, ...] = _load_synset_words()
"""For each class id, the comma-separated WordNet synonyms, e.g. ``"tench, Tinca tinca"``."""

_SYNONYMS: tuple[tuple[str, ...], ...] = tuple(
    tuple(synonym.strip() for synonym in line.split(",")) for line in IMAGENET_SYNSET_WORDS
)

IMAGENET_CLASSES: tuple[str, ...] = tuple(synonyms[0] for synonyms in _SYNONYMS)
"""For each class id, its first synonym as a short display name, e.g. ``"tench"``.

Not unique: ``"crane"`` is both 134 and 517, ``"maillot"`` both 638 and 639.
"""


def _build_index() -> Mapping[str, tuple[int, ...]]:
    index: dict[str, list[int]] = {}
    for class_id, (line, synonyms) in enumerate(zip(IMAGENET_SYNSET_WORDS, _SYNONYMS)):
        for key in {_normalize(line), *map(_normalize, synonyms)}:
            index.setdefault(key, []).append(class_id)
    return MappingProxyType({key: tuple(ids) for key, ids in index.items()})


_NAME_TO_IDS: Mapping[str, tuple[int, ...]] = _build_index()
"""Normalized whole line or single synonym -> the class ids it names (ascending)."""


def _describe(class_id: int, keep: str | None = None) -> str:
    """``"<id> (<synonyms>)"``, dropping later synonyms past the width limit.

    The first synonym and any synonym whose key equals ``keep`` are always shown.
    """
    shown: list[str] = []
    length = 0
    dropped = False
    for position, synonym in enumerate(_SYNONYMS[class_id]):
        fits = length + len(synonym) <= _DESCRIPTION_WIDTH
        if position == 0 or fits or _normalize(synonym) == keep:
            shown.append(synonym)
            length += len(synonym) + 2
        else:
            dropped = True
    text = ", ".join(shown) + (", ..." if dropped else "")
    return f"{class_id} ({text})"


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidArgumentError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _check_range(index: int, num_classes: int, shown: object) -> int:
    if not 0 <= index < num_classes:
        raise InvalidArgumentError(
            f"class id {_abbreviate(shown)} is out of range: valid ids are 0 to {num_classes - 1}"
        )
    return index


def _abbreviate(value: object) -> str:
    """``repr(value)``, shortened for numbers far beyond any class id (Python refuses to print
    integers of more than 4300 digits at all)."""
    if isinstance(value, int) and value.bit_length() > _MAX_SHOWN_BITS:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[:_MAX_SHOWN_CHARS] + "..."


def _unwrap_scalar(label: Any) -> Any:
    """numpy scalars and 0-d arrays/tensors -> the Python value (int, bool, str, ...)."""
    if hasattr(label, "ndim") and hasattr(label, "item"):
        if label.ndim != 0:
            raise InvalidArgumentTypeError(
                f"expected a single class label, got an array of shape {tuple(label.shape)}; "
                "use resolve_class_labels for several labels"
            )
        label = label.item()
    return label


def _suggestions(key: str) -> list[str]:
    # Ask difflib for more names than needed: several names (a synonym and its whole
    # line) can point at the same class, and only distinct classes are listed.
    close = difflib.get_close_matches(key, list(_NAME_TO_IDS), n=4 * _MAX_SUGGESTIONS)
    described: dict[int, str] = {}
    for name in close:
        for class_id in _NAME_TO_IDS[name]:
            if class_id not in described and len(described) < _MAX_SUGGESTIONS:
                described[class_id] = _describe(class_id, keep=name)
    return list(described.values())


def _resolve_name(name: str) -> int:
    key = _normalize(name)
    ids = _NAME_TO_IDS.get(key, ())
    if len(ids) == 1:
        return ids[0]
    if ids:
        candidates = ", ".join(_describe(class_id, keep=key) for class_id in ids)
        raise InvalidArgumentError(
            f"class name {name!r} is ambiguous; it matches {candidates}. "
            "Pass the integer id of the class you mean instead."
        )
    suggestions = _suggestions(key)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    raise InvalidArgumentError(
        f"unknown ImageNet class name {_abbreviate(name)}.{hint} "
        f"Pass an integer class id (0 to {IMAGENET_NUM_CLASSES - 1}) instead."
    )


def resolve_class_label(label: int | str, num_classes: int = 1000) -> int:
    """Turn one class label (id, digit string or ImageNet class name) into an id.

    A name matches a class when, ignoring case and extra whitespace, it equals the
    class's whole synonym line (``"tench, Tinca tinca"``) or one synonym on it
    (``"tench"``, ``"Tinca tinca"``). Names are accepted only when ``num_classes == 1000``.

    Raises:
        TypeError: the label is not an int, an integer scalar or a str (bools included).
        ValueError: the id is out of range, or the name is unknown or names several
            classes (the message lists the candidates or close names).

    Example:
        >>> resolve_class_label(" Golden Retriever ")
        207
        >>> resolve_class_label("toilet paper")
        999
        >>> resolve_class_label("7", num_classes=10)
        7
    """
    num_classes = _check_num_classes(num_classes)
    label = _unwrap_scalar(label)
    # bool is an int subclass, but True/False as a class id is almost surely a mistake.
    if isinstance(label, bool):
        raise InvalidArgumentTypeError(f"class label must be an int id or a class name, got bool {label!r}")
    if isinstance(label, str):
        text = label.strip()
        if _INT_STRING.fullmatch(text):
            if len(text.lstrip("+-").lstrip("0")) > _MAX_ID_DIGITS:  # out of any range; int() of it may be refused
                return _check_range(-1 if text.startswith("-") else num_classes, num_classes, label)
            return _check_range(int(text), num_classes, label)
        if not text:
            raise InvalidArgumentError(
                f"empty class label {label!r}: pass a class id or an ImageNet class name"
            )
        if num_classes != IMAGENET_NUM_CLASSES:
            raise InvalidArgumentError(
                f"class name {_abbreviate(label)} given, but class names are only available for "
                f"ImageNet-1k models (1000 classes) and this model has {num_classes}; "
                f"pass an integer class id (0 to {num_classes - 1}) instead"
            )
        return _resolve_name(label)
    try:
        index = operator.index(label)
    except TypeError:
        raise InvalidArgumentTypeError(
            f"class label must be an int id or a class name, got {type(label).__name__} {_abbreviate(label)}"
        ) from None
    return _check_range(index, num_classes, label)


def class_name(class_id: int) -> str:
    """The short display name (first synonym) of an ImageNet-1k class id.

    Meant for captions and file names; it is not unique (134 and 517 are both ``"crane"``),
    so do not feed it back to :func:`resolve_class_label` to recover the id.

    Example:
        >>> class_name(207)
        'golden retriever'
    """
    class_id = _unwrap_scalar(class_id)
    if isinstance(class_id, bool):
        raise InvalidArgumentTypeError(f"class id must be an int, got bool {class_id!r}")
    try:
        index = operator.index(class_id)
    except TypeError:
        raise InvalidArgumentTypeError(
            f"class id must be an int, got {type(class_id).__name__} {_abbreviate(class_id)}; "
            "use resolve_class_label to turn a name or digit string into an id"
        ) from None
    return IMAGENET_CLASSES[_check_range(index, IMAGENET_NUM_CLASSES, class_id)]


def label_ids(num_classes: int = 1000) -> dict[str, int]:
    """Every class name a model of ``num_classes`` classes takes, and its id.

    ImageNet-1k models: each synonym as the data file writes it (``"golden retriever"``, ``"Tinca
    tinca"``), except the few shared by several classes (``"crane"``), which name no one class and
    are refused as labels. Other models (``xar-digits``) name their classes by id: ``"0"``, ``"1"``, ...

    Example:
        >>> label_ids()["golden retriever"], "crane" in label_ids(), label_ids(10)["7"]
        (207, False, 7)
    """
    num_classes = _check_num_classes(num_classes)
    if num_classes != IMAGENET_NUM_CLASSES:
        return {str(i): i for i in range(num_classes)}
    names: dict[str, int] = {}
    for class_id, synonyms in enumerate(_SYNONYMS):
        for synonym in synonyms:
            if _NAME_TO_IDS[_normalize(synonym)] == (class_id,):
                names.setdefault(synonym, class_id)
    return names


def resolve_class_labels(labels: Any, num_classes: int = 1000) -> list[int]:
    """Turn one label or several (list, tuple, 1-D tensor or array) into a list of ids.

    Order and repeats are kept as given.

    Example:
        >>> resolve_class_labels("tench")
        [0]
        >>> resolve_class_labels(["goldfish", 207])
        [1, 207]
    """
    if isinstance(labels, (str, int)) or (hasattr(labels, "ndim") and labels.ndim == 0):
        return [resolve_class_label(labels, num_classes)]
    if hasattr(labels, "ndim") and hasattr(labels, "tolist"):
        if labels.ndim != 1:
            raise InvalidArgumentError(
                f"class labels must be 1-D, got an array of shape {tuple(labels.shape)}"
            )
        labels = labels.tolist()
    elif isinstance(labels, (bytes, bytearray)) or not isinstance(labels, Sequence):
        raise InvalidArgumentTypeError(
            "class labels must be an int, a str, a list/tuple of them, or a 1-D "
            f"integer tensor/array; got {type(labels).__name__}"
        )
    if len(labels) == 0:
        raise InvalidArgumentError("no class labels given: pass at least one class id or name")
    ids = []
    for position, label in enumerate(labels):
        try:
            ids.append(resolve_class_label(label, num_classes))
        except (TypeError, ValueError) as error:
            raise type(error)(f"labels[{position}]: {error}") from None
    return ids
