"""From model to answer: test-time flips, the decision rule, calibrated probabilities, "unknown".

One module, used by `evaluate` (which chooses the rule and scores it), `predict`, the web page and
`export`'s agreement check: a figure in metrics/ and an answer people see come from one computation
(`judge`, and `Predictor.describe` around it). models/decision.json (+ ood.npz) holds the rule.
- Flips: the mean over an image and its 3 flips (dermoscopy has no "up"; a flip, unlike a quarter
  turn, keeps augment's stretched axis).
- Decision: log-probabilities + `class_bias` (strength * log class share, the strength chosen on
  validation for balanced accuracy), then `mel` when that p(mel) >= `mel_threshold` (chosen on
  validation for a target sensitivity), else the top class; "unknown" when the image is out of
  distribution (stages/lib/ood.py).
- Shown probabilities: calibrated (stages/lib/calibration.py) to HAM10000's class mix. They do not
  decide: what decides and what is shown are separate, so calibration never moves a figure of the rule.
- Metadata (age, sex, site; stages/lib/metadata.py): where an image comes with some, its
  probabilities are multiplied by their likelihood ratio (`metadata.combine`), and the same rule
  decides with its own values, chosen on validation for that path (`MetadataRule`).
`describe` says why each decision is what it is (`reason`), in words true of the figures shown.
`load_decision`, the one reader of decision.json, checks every key and names the file, the key
and the fix in one line.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.lib.calibration import calibrated, reweighted
from stages.lib.cli import ParamError, StageError
from stages.lib.dataset import CLASS_NAMES, CLASSES, MELANOMA
from stages.lib.metadata import Metadata, MetadataModel, combine
from stages.lib.ood import FEATURE_LAYER, OodDetector
from stages.lib.params import from_dict, in_range

TTA = Literal["none", "flips"]
UNKNOWN = "unknown"  # the decision for an image out of distribution
TOP = 3              # classes listed per image
DIGITS = 4           # rounding of every figure shown per image: more would be false precision
REMEDY = "run: dvc repro evaluate"


def flips(images: np.ndarray) -> list[np.ndarray]:
    """The image batch (N, H, W, C) and its horizontal, vertical and double flips."""
    return [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]


VIEWS: dict[str, Callable[[np.ndarray], list[np.ndarray]]] = {"none": lambda images: [images], "flips": flips}
"""The views of an image batch whose probabilities are averaged, by `tta` setting."""


def predict_proba(model, images: np.ndarray, tta: TTA = "none", batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, 7) of `images` (uint8 or float pixels in [0, 255]).

    `model` is a Keras model or any callable mapping a float32 batch to probabilities (a TFLite
    interpreter wrapped by `export`).
    """
    return mean_over_views(model, VIEWS[tta](images), batch_size)


def _run(model, view: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The model's outputs on one view, as a list (one array per output)."""
    if hasattr(model, "predict"):
        out = model.predict(view, batch_size=batch_size, verbose=0)
    else:
        parts = [model(view[i:i + batch_size]) for i in range(0, len(view), batch_size)]
        out = np.concatenate(parts) if not isinstance(parts[0], (list, tuple)) else \
            [np.concatenate(p) for p in zip(*parts)]
    return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else [np.asarray(out)]


def mean_over_views(model, views: list[np.ndarray], batch_size: int = 64):
    """The mean output over several views (N, H, W, C each) of the same images: one array for a
    one-output model (class probabilities), else a list of arrays, one per output."""
    total = None
    for view in views:
        out = _run(model, np.ascontiguousarray(view, dtype=np.float32), batch_size)
        total = [o.astype(np.float64) for o in out] if total is None else [t + o for t, o in zip(total, out)]
    means = [(t / len(views)).astype(np.float32) for t in total]
    return means[0] if len(means) == 1 else means


def feature_model(model):
    """A Keras model giving [features, probabilities] from `model`'s own layers (its weights, not a
    copy): the features are FEATURE_LAYER's activations averaged over the image.

    The layers are applied again as the chain stages/train.py builds (one input, one path), so the
    sub-model is the same whether `model` was loaded from a file or built in this process.
    """
    import keras

    if FEATURE_LAYER not in [layer.name for layer in model.layers]:
        raise StageError(f"model {model.name!r} has no layer {FEATURE_LAYER!r} (not made by stages/train.py)")
    inputs = keras.Input(tuple(model.input_shape[1:]), name="image")
    x, features = inputs, None
    for layer in model.layers[1:]:
        x = layer(x)
        if layer.name == FEATURE_LAYER:
            features = keras.layers.GlobalAveragePooling2D(name="ood_features")(x)
    return keras.Model(inputs, [features, x], name=f"{model.name}_with_features")


def model_outputs(features_model, images: np.ndarray, tta: TTA, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, 7), pooled features (N, D)), each the mean over the `tta` views."""
    if len(images) == 0:
        width = int(features_model.outputs[0].shape[-1])
        return np.zeros((0, len(CLASSES)), np.float32), np.zeros((0, width), np.float32)
    features, proba = mean_over_views(features_model, VIEWS[tta](images), batch_size)
    return proba, features


@dataclass(frozen=True, eq=False)
class Decision:
    """How probabilities become an answer and what is shown; chosen on validation by `evaluate`."""

    tta: TTA
    class_bias: tuple[float, ...]    # added to log-probabilities, one per class (all 0: no correction)
    prior_strength: float            # the strength that gave class_bias (for people)
    mel_threshold: float             # corrected p(mel) at or above this -> decision "mel"
    mel_sensitivity_target: float    # what the threshold was chosen for, on validation
    temperature: float = 1.0         # shown probabilities: softmax(log p / T + log class_prior)
    class_prior: tuple[float, ...] | None = None  # shown probabilities' class shares (None: uniform)
    ood: OodDetector | None = None   # "unknown" above its threshold (None: every image is judged)
    with_metadata: MetadataRule | None = None  # the rule for images that come with metadata (None: ignored)

    def for_metadata(self) -> Decision:
        """This rule with the metadata path's own values (the same views, prior and detector)."""
        rule = self.with_metadata
        return replace(self, class_bias=rule.class_bias, prior_strength=rule.prior_strength,
                       mel_threshold=rule.mel_threshold, temperature=rule.temperature, with_metadata=None)

    def save(self, path: Path, ood_path: Path | None = None) -> dict:
        """Write decision.json at `path`, and the detector's parameters at `ood_path` (default:
        ood.npz beside it), parameters first: the record names them with their checksum. The
        metadata model is stage `metadata`'s file; the record names it with its checksum."""
        from stages.lib.files import atomic_write_json

        ood = None
        if self.ood is not None:
            ood = self.ood.save(Path(ood_path) if ood_path else Path(path).with_name("ood.npz"))
        record = {**{k: v for k, v in asdict(self).items() if k not in ("ood", "class_prior", "with_metadata")},
                  "class_bias": dict(zip(CLASSES, self.class_bias)),
                  "class_prior": None if self.class_prior is None else dict(zip(CLASSES, self.class_prior)),
                  "ood": ood, "chosen_on": "val"}
        if self.with_metadata is not None:
            record["with_metadata"] = self.with_metadata.record()
        atomic_write_json(Path(path), record)
        return record


@dataclass(frozen=True, eq=False)
class MetadataRule:
    """The metadata path: probabilities times the metadata's likelihood ratio to `weight`, then
    the decision rule's steps with these values (chosen on validation for this path)."""

    weight: float
    class_bias: tuple[float, ...]
    prior_strength: float
    mel_threshold: float
    temperature: float
    model: MetadataModel
    model_file: dict[str, str]       # {"file", "sha256"}: the metadata stage's file it was chosen with

    def record(self) -> dict[str, Any]:
        return {"weight": self.weight, "class_bias": dict(zip(CLASSES, self.class_bias)),
                "prior_strength": self.prior_strength, "mel_threshold": self.mel_threshold,
                "temperature": self.temperature, "model": self.model_file}


PLAIN = Decision(tta="none", class_bias=(0.0,) * len(CLASSES), prior_strength=0.0, mel_threshold=1.0,
                 mel_sensitivity_target=1.0)
"""No rule: the model's own probabilities, one view, no correction, no calibration, no "unknown"."""


@dataclass(frozen=True)
class DecisionRecord:
    """decision.json as Decision.save writes it, read as params.yaml's sections are
    (params.from_dict: types, finite numbers, no key missing or unknown), ranges checked here."""

    tta: TTA
    class_bias: dict[str, float]
    prior_strength: float
    mel_threshold: float
    mel_sensitivity_target: float
    temperature: float
    class_prior: dict[str, float] | None
    ood: dict[str, Any] | None       # checked by OodDetector.load
    chosen_on: Literal["val"] = "val"
    with_metadata: MetadataRecord | None = None

    def __post_init__(self) -> None:
        check_rule(self)
        in_range("mel_sensitivity_target", self.mel_sensitivity_target, 0, 1, lo_open=True)
        one_per_class("class_prior", self.class_prior)
        for dx, share in (self.class_prior or {}).items():
            in_range(f"class_prior.{dx}", share, 0, lo_open=True)


def one_per_class(key: str, value: dict[str, float] | None) -> None:
    """A ValueError unless `value` (if any) has one key per class."""
    if value is not None and sorted(value) != sorted(CLASSES):
        raise ValueError(f"{key} must have one value per class ({', '.join(CLASSES)}), got keys {sorted(value)}")


def check_rule(record: DecisionRecord | MetadataRecord) -> None:
    """The values both paths' rules hold: prior strength, melanoma threshold, temperature, class_bias."""
    in_range("prior_strength", record.prior_strength, -10, 10)
    in_range("mel_threshold", record.mel_threshold, 0, 1)
    in_range("temperature", record.temperature, 0, 1000, lo_open=True)
    one_per_class("class_bias", record.class_bias)


@dataclass(frozen=True)
class MetadataRecord:
    """decision.json's `with_metadata`: MetadataRule.record, checked as DecisionRecord is."""

    weight: float
    class_bias: dict[str, float]
    prior_strength: float
    mel_threshold: float
    temperature: float
    model: dict[str, str]            # {"file", "sha256"}, checked by MetadataModel.load

    def __post_init__(self) -> None:
        in_range("weight", self.weight, 0, 10)
        check_rule(self)


def load_decision(path: Path) -> Decision:
    """The rule evaluate stored at `path` (and its ood.npz), every key checked; a StageError of one
    line naming the file, the key, the bad value and `dvc repro evaluate` otherwise."""
    from stages.lib.files import read_json

    path = Path(path)
    try:
        record = from_dict(DecisionRecord, read_json(path, made_by="evaluate"), "decision")
    except ParamError as err:
        raise StageError(f"{path}: {err} ({REMEDY})") from None
    try:
        ood = None if record.ood is None else OodDetector.load(record.ood, path.parent, str(path))
        meta = record.with_metadata
        rule = None if meta is None else MetadataRule(
            weight=meta.weight, class_bias=tuple(meta.class_bias[dx] for dx in CLASSES),
            prior_strength=meta.prior_strength, mel_threshold=meta.mel_threshold, temperature=meta.temperature,
            model=MetadataModel.load(meta.model, path.parent, str(path)), model_file=meta.model)
    except StageError as err:
        raise StageError(f"{err} ({REMEDY})") from None
    return Decision(tta=record.tta, class_bias=tuple(record.class_bias[dx] for dx in CLASSES),
                    prior_strength=record.prior_strength, mel_threshold=record.mel_threshold,
                    mel_sensitivity_target=record.mel_sensitivity_target, temperature=record.temperature,
                    class_prior=None if record.class_prior is None else tuple(record.class_prior[dx] for dx in CLASSES),
                    ood=ood, with_metadata=rule)


def prior_bias(train_labels: np.ndarray, strength: float) -> np.ndarray:
    """Per-class offsets strength * log(share of the real training images), centred on 0.

    strength 1 is Bayes' correction from the balanced training prior to the real one (favours
    `nv`); negative strengths favour the rare classes; 0 changes nothing.
    """
    log_share = np.log(class_shares(train_labels))
    return strength * (log_share - log_share.mean())


def class_shares(train_labels: np.ndarray) -> np.ndarray:
    """Each class's share of the real training images (a class without images counts as one)."""
    counts = np.bincount(train_labels, minlength=len(CLASSES)).astype(np.float64)
    return np.maximum(counts, 1) / np.maximum(counts, 1).sum()


def corrected(proba: np.ndarray, class_bias) -> np.ndarray:
    """Probabilities after adding `class_bias` to their logarithms (renormalised), as float32:
    `calibration.reweighted` at temperature 1 with class_bias as the log prior."""
    return reweighted(proba, 1.0, np.asarray(class_bias, dtype=np.float64)).astype(np.float32)


def decide(proba: np.ndarray, mel_threshold: float) -> np.ndarray:
    """Class codes at the operating point: melanoma if p(mel) >= threshold, else the top class."""
    return np.where(proba[:, MELANOMA] >= mel_threshold, MELANOMA, proba.argmax(axis=1))


def threshold_for_sensitivity(labels: np.ndarray, p_mel: np.ndarray, target: float) -> float:
    """The highest threshold whose melanoma sensitivity on these images is at least `target`."""
    scores = np.sort(p_mel[labels == MELANOMA])[::-1]
    if len(scores) == 0:
        return 0.5
    needed = int(np.ceil(target * len(scores)))  # melanomas that must be at or above the threshold
    return float(scores[max(needed, 1) - 1])


@dataclass(frozen=True, eq=False)
class Judgement:
    """A batch's answers under a Decision, as arrays (N rows each)."""

    corrected: np.ndarray         # (N, 7) probabilities after the class-prior correction: they decide
    decided: np.ndarray           # (N,) class code at the operating point (whether or not in distribution)
    shown: np.ndarray             # (N, 7) calibrated probabilities: what people are shown
    ood_score: np.ndarray         # (N,) out-of-distribution score (0 without a detector)
    in_distribution: np.ndarray   # (N,) bool: False -> the answer is "unknown"
    mel_threshold: np.ndarray     # (N,) the threshold each row's melanoma decision used
    with_metadata: np.ndarray     # (N,) bool: the metadata path decided (its rule and probabilities)


def _answers(decision: Decision, proba: np.ndarray) -> dict[str, np.ndarray]:
    """Under one rule: the corrected probabilities that decide, the decisions, the shown probabilities."""
    fixed = corrected(proba, decision.class_bias)
    return {"corrected": fixed, "decided": decide(fixed, decision.mel_threshold),
            "shown": calibrated(proba, decision.temperature, decision.class_prior),
            "mel_threshold": np.full(len(proba), decision.mel_threshold)}


def metadata_used(decision: Decision, rows: list[Metadata] | None, n: int) -> np.ndarray:
    """(N,) bool: the rows whose metadata the rule uses (it has a metadata path, and a fitted field is known)."""
    if decision.with_metadata is None or rows is None:
        return np.zeros(n, bool)
    return decision.with_metadata.model.uses(rows)


def judge(decision: Decision, proba: np.ndarray, features: np.ndarray, rows: list[Metadata] | None = None
          ) -> Judgement:
    """The answers for model outputs (`model_outputs`) and, optionally, each image's metadata: the
    one computation behind every figure. A row with usable metadata is judged on the combined
    probabilities under the metadata path's rule; every other row on the image alone. The
    out-of-distribution score looks at the image only."""
    scores = decision.ood.score(features) if decision.ood is not None else np.zeros(len(proba))
    inside = decision.ood.in_distribution(scores) if decision.ood is not None else np.ones(len(proba), bool)
    answers, used = _answers(decision, proba), metadata_used(decision, rows, len(proba))
    if used.any():
        rule = decision.with_metadata
        both = _answers(decision.for_metadata(), combine(proba, rule.model.log_ratio(rows), rule.weight))
        answers = {name: np.where(used.reshape((-1,) + (1,) * (value.ndim - 1)), both[name], value)
                   for name, value in answers.items()}
    return Judgement(**answers, ood_score=scores, in_distribution=inside, with_metadata=used)


def top_k(proba: np.ndarray, k: int = TOP) -> list[dict[str, Any]]:
    """The k most probable classes of one image, most probable first (ties: class-code order)."""
    order = np.argsort(-np.asarray(proba), kind="stable")[:k]
    return [{"dx": CLASSES[c], "name": CLASS_NAMES[CLASSES[c]], "probability": round(float(proba[c]), DIGITS)}
            for c in order]


def weighting(strength: float) -> str:
    """What the weighted scores are, for a prior strength (the sign says which classes gain)."""
    if strength == 0:
        return "Weighted score: the model's own probability, before calibration (no class is weighed up)."
    gains = "rarer diseases weighed up" if strength < 0 else "commoner diseases weighed up"
    return (f"Weighted score: the model's probability with {gains} (class-prior strength {strength:g}, chosen on "
            "validation for balanced accuracy); the top weighted score decides, unless melanoma reaches its threshold.")


def reason(decision: Decision, judged: Judgement, n: int) -> str:
    """Why row n's decision is what it is, in words true of the figures shown for it: "the most
    probable class" only when the decision is the first class listed (`top_k` of `shown`)."""
    if not judged.in_distribution[n]:
        return ("No diagnosis: the image is unlike the dermoscopic images the model was trained on "
                "(out of distribution), so its probabilities are not trusted.")
    code, shown, weighted = int(judged.decided[n]), judged.shown[n], judged.corrected[n]
    name, first = CLASS_NAMES[CLASSES[code]].capitalize(), int(np.argsort(-shown, kind="stable")[0])
    said = "the most probable class shown" if code == first else \
        f"although {CLASS_NAMES[CLASSES[first]]} is more probable ({shown[first]:.1%})"
    if code == MELANOMA and weighted[MELANOMA] >= judged.mel_threshold[n]:
        return (f"{name}: its weighted score {weighted[MELANOMA]:.1%} is at or above the melanoma threshold "
                f"{judged.mel_threshold[n]:.1%}, set on validation to find "
                f"{decision.mel_sensitivity_target:.0%} of melanomas; {said}.")
    return f"{name}: the highest weighted score ({weighted[code]:.1%}); {said}."


def describe(decision: Decision, judged: Judgement, rows: list[Metadata] | None = None) -> list[dict[str, Any]]:
    """Per image, what people are shown (see Predictor.describe)."""
    rule = decision.with_metadata
    return [{"top": top_k(judged.shown[n]),
             "probabilities": {dx: round(float(judged.shown[n, k]), DIGITS) for k, dx in enumerate(CLASSES)},
             "weighted": {dx: round(float(judged.corrected[n, k]), DIGITS) for k, dx in enumerate(CLASSES)},
             "decision": CLASSES[judged.decided[n]] if judged.in_distribution[n] else UNKNOWN,
             "reason": reason(decision, judged, n),
             "weighting": weighting(rule.prior_strength if judged.with_metadata[n] else decision.prior_strength),
             "in_distribution": bool(judged.in_distribution[n]),
             "ood_score": round(float(judged.ood_score[n]), DIGITS),
             "mel_probability": float(judged.corrected[n, MELANOMA]),  # unrounded: compared with the threshold
             "mel_threshold": float(judged.mel_threshold[n]),
             "with_metadata": bool(judged.with_metadata[n]),
             "metadata": rows[n].as_dict() if judged.with_metadata[n] else {}}
            for n in range(len(judged.decided))]


class Predictor:
    """A trained model with its Decision: images in, the per-image results people are shown out."""

    def __init__(self, model, decision: Decision, batch_size: int = 64) -> None:
        self.model, self.decision, self.batch_size = model, decision, batch_size
        self.features_model = feature_model(model)
        self.image_size = int(model.input_shape[1])

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, features) of `images` under the decision's test-time views."""
        return model_outputs(self.features_model, images, self.decision.tta, self.batch_size)

    def judge(self, images: np.ndarray, rows: list[Metadata] | None = None) -> Judgement:
        return judge(self.decision, *self.outputs(images), rows)

    def describe(self, images: np.ndarray, rows: list[Metadata] | None = None) -> list[dict[str, Any]]:
        """Per image of `images` (uint8, N x size x size x 3), with its Metadata in `rows` if any:
        {"top": 3 x {dx, name, probability}, "probabilities": {dx: p} (calibrated, shown),
        "weighted": {dx: score} (prior-corrected: they decide), "decision": dx or "unknown",
        "reason": why, in words true of these figures, "weighting": what the weighted score is,
        "in_distribution", "ood_score",
        "mel_probability" (the weighted p(mel) the threshold is applied to), "mel_threshold",
        "with_metadata" (the metadata path decided), "metadata" (the fields it used; {} if none)}.
        Probabilities, scores and ood_score are rounded to 4 decimals; the melanoma figures are
        not, so that reading them gives the decision's own comparison."""
        return describe(self.decision, self.judge(images, rows), rows)
