"""The model card says which committed settings test figures helped choose, as docs/experiments.md
("Where test helped choose") records them, and no longer that test never chose anything."""
import re
from pathlib import Path

import yaml

from stages.lib.model_card import TEST_INFORMED, TrainFacts, model_section

ROOT = Path(__file__).resolve().parents[2]
FACTS = {"parameters": 10, "trainable_parameters": 6, "layers_with_weights": 4, "frozen_layers": 1}


def card_model_section():
    return model_section(TrainFacts(weights="imagenet", alpha=1.0, trainable_from="all", freeze_batchnorm=True),
                         FACTS, 160)


def record_section():
    """docs/experiments.md's "Where test helped choose", up to the next heading."""
    text = (ROOT / "docs" / "experiments.md").read_text()
    return text.split("\n## Where test helped choose\n", 1)[1].split("\n## ", 1)[0]


def named_keys(text):
    return set(re.findall(r"`((?:augment|train|evaluate|export)\.\w+)", text))


def test_the_card_lists_the_settings_test_helped_choose():
    card = card_model_section()
    assert "never to choose anything" not in card
    assert 'Test figures did help choose these committed settings (docs/experiments.md, "Where test helped choose"):' \
        in card
    listed = [line for line in card.splitlines() if line.startswith("  - ")]
    assert len(listed) == len(TEST_INFORMED)
    # the record's list, read by hand: export (#51-#56), #1-#8's training choices
    assert {"export.int8_float_ops", "export.representative_images",
            "train.warmup_epochs", "train.min_learning_rate", "augment.target_per_class",
            "train.trainable_from", "train.learning_rate", "train.average_last_epochs",
            "evaluate.tta"} <= named_keys("\n".join(listed))


def test_the_card_and_the_record_name_the_same_settings_and_each_is_a_params_key():
    card = named_keys(" ".join(setting for setting, _ in TEST_INFORMED))
    assert card == named_keys(record_section())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in card:
        section, name = key.split(".")
        assert name in params[section], f"{key} is not in params.yaml"


def test_the_disclosed_export_settings_are_still_the_committed_ones():
    """The disclosure is about these values: re-choosing one (on validation) means updating
    TEST_INFORMED and docs/experiments.md's "Where test helped choose" with it."""
    export = yaml.safe_load((ROOT / "params.yaml").read_text())["export"]
    assert export["int8_float_ops"] == ["DEPTHWISE_CONV_2D"]  # #54
    assert export["representative_images"] == 1000  # #53, #54
    assert export["int8_float_layers"] == ["conv_pw_1", "conv_pw_2", "conv_pw_3", "conv_pw_4"]  # #81: on val alone
