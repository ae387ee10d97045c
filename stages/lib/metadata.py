"""Patient metadata (age, sex, body site): checked values, and what they say about the diagnosis.

A `Metadata` holds the fields a user knows (any may be missing). `MetadataModel` is one
multinomial logistic regression per set of known fields, fitted on the real training images'
rows (stages/metadata.py), so a missing field is left out, never guessed. `log_ratio` is
log p(class | fields) - log p(class) of those rows: the evidence the fields add to the image
model's probabilities (`combine`, weighted by `evaluate.metadata_weight`). Never `dx_type`: it
records how the diagnosis was confirmed. Why a second stage and not fusion: docs/metadata.md.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.calibration import reweighted
from stages.lib.cli import StageError
from stages.lib.dataset import CLASSES

FIELDS = ("age", "sex", "localization")  # HAM10000's column names; the page and predict say "site" too
SEXES = ("female", "male")
SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity",
         "neck", "scalp", "trunk", "upper extremity")  # HAM10000's localizations, less "unknown"
MISSING = ("", "unknown", "nan", "none")   # read as "not known", in any case
AGE_LIMIT = 120        # years; an age outside 0..AGE_LIMIT is an error
AGE_STEP = 5           # HAM10000 gives ages in steps of 5 years: one feature per step...
AGE_TOP = 85           # ...up to this band (older ages count as 85, HAM10000's oldest)


@dataclass(frozen=True)
class Metadata:
    """What is known of one patient and lesion; None: not known."""

    age: float | None = None
    sex: str | None = None
    localization: str | None = None

    @property
    def known(self) -> tuple[str, ...]:
        return tuple(field for field in FIELDS if getattr(self, field) is not None)

    def as_dict(self) -> dict[str, Any]:
        """The known fields, as the JSON result reports them."""
        return {field: value for field, value in asdict(self).items() if value is not None}


NONE = Metadata()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and value.strip().lower() in MISSING)


def parse(age: Any = None, sex: Any = None, localization: Any = None) -> Metadata:
    """A checked Metadata from text or numbers; "", "unknown" or NaN count as not known. A bad value
    is a ValueError naming the field, the value and what is accepted."""
    if not _missing(age):
        try:
            years = float(str(age).strip())
        except ValueError:
            years = float("nan")
        if not 0 <= years <= AGE_LIMIT:
            raise ValueError(f"age {age!r}: not a number of years from 0 to {AGE_LIMIT}")
        age = years
    else:
        age = None
    sex = None if _missing(sex) else str(sex).strip().lower()
    if sex is not None and sex not in SEXES:
        raise ValueError(f"sex {sex!r}: not one of {', '.join(SEXES)} (or leave it out)")
    site = None if _missing(localization) else str(localization).strip().lower().replace("_", " ")
    if site is not None and site not in SITES:
        raise ValueError(f"localization {site!r}: not one of {', '.join(SITES)} (or leave it out)")
    return Metadata(age, sex, site)


def _columns(table) -> list:
    """The table's age, sex and localization columns, in FIELDS order (a missing one: all None)."""
    return [table[field] if field in table else [None] * len(table) for field in FIELDS]


def of_table(table) -> list[Metadata]:
    """Each row's Metadata from a table with HAM10000's columns (a missing column: not known)."""
    return [parse(*values) for values in zip(*_columns(table))]


def read_csv(path: Path) -> dict[str, Metadata | str]:
    """{image_id: Metadata, or the one-line error of that row} from a CSV with HAM10000's column
    names (`image_id` required; `age`, `sex`, `localization` optional; other columns ignored)."""
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise StageError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    if "image_id" not in table:
        raise StageError(f"{path}: no image_id column (HAM10000's columns: image_id, {', '.join(FIELDS)})")
    ids = table["image_id"].str.strip()
    repeated = ids[ids.duplicated()]
    if len(repeated):
        raise StageError(f"{path}: image_id {repeated.iloc[0]!r} is on more than one row")
    rows: dict[str, Metadata | str] = {}
    for line, (image_id, *values) in enumerate(zip(ids, *_columns(table)), start=2):
        try:
            rows[image_id] = parse(*values)
        except ValueError as err:
            rows[image_id] = f"{path}, line {line}: {err}"
    return rows


def features(rows: list[Metadata], fields: tuple[str, ...]) -> np.ndarray:
    """One-hot design matrix (N, D) of `fields` (each known in every row): age in 5-year bands, sex, site."""
    blocks = []
    for field in fields:
        if field == "age":
            bands = np.minimum([int(r.age // AGE_STEP) for r in rows], AGE_TOP // AGE_STEP)
            blocks.append(np.eye(AGE_TOP // AGE_STEP + 1)[bands])
        else:
            values = SEXES if field == "sex" else SITES
            blocks.append(np.eye(len(values))[[values.index(getattr(r, field)) for r in rows]])
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(rows), 0))


@dataclass(frozen=True, eq=False)
class MetadataModel:
    """Per set of known fields (sorted as FIELDS), a logistic regression and its rows' class shares."""

    fields: tuple[str, ...]                     # the fields it was fitted with (a subset of FIELDS)
    fits: dict[tuple[str, ...], dict[str, Any]]  # known fields -> {"coef" (7, D), "intercept" (7,), "shares" (7,)}

    def log_ratio(self, rows: list[Metadata]) -> np.ndarray:
        """(N, 7) log p(class | known fields) - log p(class); 0 where no fitted field is known."""
        out = np.zeros((len(rows), len(CLASSES)))
        keys = [self.fitted(tuple(f for f in r.known if f in self.fields)) for r in rows]
        for key in set(keys) - {()}:
            index = [n for n, k in enumerate(keys) if k == key]
            fit = self.fits[key]
            logits = features([rows[n] for n in index], key) @ np.asarray(fit["coef"]).T + fit["intercept"]
            log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            out[index] = log_p - np.log(fit["shares"])
        return out

    def uses(self, rows: list[Metadata]) -> np.ndarray:
        """(N,) bool: the rows that know at least one field the model was fitted with."""
        return np.array([bool(self.fitted(row.known)) for row in rows], bool)

    def fitted(self, known: tuple[str, ...]) -> tuple[str, ...]:
        """The largest fitted set of the `known` fields (first in FIELDS order on a tie); () if none."""
        by_size = sorted(known_subsets(known), key=len, reverse=True)  # stable: FIELDS order within a size
        return next((key for key in by_size if key in self.fits), ())

    def to_json(self) -> dict[str, Any]:
        return {"fields": list(self.fields), "classes": list(CLASSES),
                "fits": [{"known": list(key), **{k: np.asarray(v).tolist() for k, v in fit.items()}}
                         for key, fit in self.fits.items()]}

    def save(self, path: Path) -> dict[str, Any]:
        """Write the model as JSON at `path` (atomically); returns decision.json's record of it."""
        from stages.lib.files import atomic_write_bytes

        data = (json.dumps(self.to_json(), indent=1) + "\n").encode()
        atomic_write_bytes(Path(path), data)
        return {"file": Path(path).name, "sha256": hashlib.sha256(data).hexdigest()}

    @classmethod
    def read(cls, path: Path) -> tuple[MetadataModel, dict[str, str]]:
        """(the model stored at `path`, decision.json's record of it); a StageError naming the file."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StageError(f"{path}: cannot read the metadata model ({err.strerror}; "
                             "run: dvc repro metadata)") from None
        try:
            stored = json.loads(data)
            if stored["classes"] != list(CLASSES):
                raise ValueError(f"classes {stored['classes']} are not {list(CLASSES)}")
            fits = {tuple(fit["known"]): {k: np.asarray(fit[k], np.float64) for k in ("coef", "intercept", "shares")}
                    for fit in stored["fits"]}
            model = cls(tuple(stored["fields"]), fits)
        except (ValueError, KeyError, TypeError) as err:
            raise StageError(f"{path}: not a metadata model ({err}; run: dvc repro metadata)") from None
        return model, {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}

    @classmethod
    def load(cls, record: dict[str, Any], folder: Path, where: str) -> MetadataModel:
        """The model decision.json's record names, refused unless its sha256 matches."""
        model, found = cls.read(Path(folder) / str(record.get("file")))
        if found["sha256"] != record.get("sha256"):
            raise StageError(f"{Path(folder) / found['file']}: not the file {where} was written with (sha256 differs)")
        return model


def known_subsets(fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every non-empty set of `fields`, each in FIELDS order."""
    ordered = [f for f in FIELDS if f in fields]
    return [c for size in range(1, len(ordered) + 1) for c in itertools.combinations(ordered, size)]


def fit(rows: list[Metadata], labels: np.ndarray, fields: tuple[str, ...], regularization: float) -> MetadataModel:
    """One logistic regression (L2, C = `regularization`) per set of fields, each on the rows that
    know all of that set's fields; a set whose rows lack a class is left out (`fitted` falls back)."""
    from sklearn.linear_model import LogisticRegression

    fits = {}
    for key in known_subsets(fields):
        index = [n for n, r in enumerate(rows) if all(getattr(r, f) is not None for f in key)]
        y = np.asarray(labels)[index]
        counts = np.bincount(y, minlength=len(CLASSES)).astype(np.float64)
        if not counts.all():
            continue
        regression = LogisticRegression(C=regularization, max_iter=5000).fit(features([rows[n] for n in index], key), y)
        fits[key] = {"coef": regression.coef_, "intercept": regression.intercept_, "shares": counts / counts.sum()}
    return MetadataModel(tuple(f for f in FIELDS if f in fields), fits)


def combine(proba: np.ndarray, log_ratio: np.ndarray, weight: float) -> np.ndarray:
    """The image model's probabilities times the metadata's likelihood ratio to the power `weight`,
    renormalised (float32, as the model's): naive Bayes when weight is 1, the image alone at 0."""
    return reweighted(np.asarray(proba, np.float64), 1.0, weight * log_ratio).astype(np.float32)
