"""docs/experiments.md's key figures, recomputed from the files they come from.

Each expected figure is computed here from `experiments/results/*.json` or `metrics/` (plain
subtraction, `statistics.mean` and `stdev`), written as the page writes it, and looked up in the
row or paragraph that quotes it: a page or result file edited out of step with the other fails.
"""
import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "experiments.md"
RESULTS = ROOT / "experiments" / "results"
COLUMNS = ("#", "configuration", "machine", "val", "difference", "test", "decision", "date", "result file")
VAL_IMAGES = 1290  # validation images of the committed split (the int8 rows count images)


def result(name):
    return json.loads((RESULTS / name).read_text())


def metrics(name):
    return json.loads((ROOT / "metrics" / name).read_text())


def table():
    """Row number -> {column: cell} from the page's table."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            assert len(cells) == len(COLUMNS), f"row {cells[0]} has {len(cells)} cells"
            rows[int(cells[0])] = dict(zip(COLUMNS, cells))
    return rows


def prose():
    """The page with every run of whitespace made one space (paragraphs wrap anywhere)."""
    return " ".join(PAGE.read_text().split())


def f3(x):
    return f"{x:.3f}"


def mean_sd(xs, places=3, sd_places=None, signed=False):
    """'mean ± sd' as the page writes it: `places` decimals (the sd: `sd_places`, default the same)."""
    mean = f"{statistics.mean(xs):{'+' if signed else ''}.{places}f}"
    return f"{mean} ± {statistics.stdev(xs):.{sd_places or places}f}"


def ba(run, split):
    return run[split]["balanced_accuracy"]


def intel_seeds(seed42, summary):
    """Seeds 42, 1, 2 of one configuration on the Intel: its dvc repro (seed 42), then the summary's."""
    return [seed42] + [result(summary)["runs"][seed] for seed in ("seed1", "seed2")]


# #42; the repro file holds this CPU's run and, under "committed", the AMD run committed then
ZOOM_INTEL = intel_seeds(result("zoom_0.2_repro_seed42.intel.json")["this_cpu"], "zoom_0.2_vs_amd.intel.json")
WB_INTEL = intel_seeds(result("white_balance_0.1_repro_seed42.intel.json"),  # #46
                       "white_balance_0.1_vs_zoom_0.2.intel.json")


def zoom_amd():
    """#35 on the AMD, seeds 42, 1, 2: the run committed then (kept in the Intel repro's file), seeds 1, 2."""
    runs = result("zoom_0.2_vs_zoom_0.1.amd.json")["runs"]
    return [result("zoom_0.2_repro_seed42.intel.json")["committed"], runs["seed1"], runs["seed2"]]


def test_the_table_has_every_row_once_in_order():
    assert list(table()) == list(range(1, max(table()) + 1))


def test_row_42_is_the_three_intel_seeds_of_zoom_0_2():
    row = table()[42]
    val, test = [ba(r, "val") for r in ZOOM_INTEL], [ba(r, "test") for r in ZOOM_INTEL]
    assert row["val"] == f"{mean_sd(val)} ({', '.join(map(f3, val))})"
    assert row["test"] == f"{mean_sd(test, sd_places=4)} ({', '.join(map(f3, test))})"
    assert row["test"].startswith("0.718 ± 0.0015 ")  # hand-checked: 0.7167, 0.7185, 0.7196
    intel_minus_amd = [f"{ba(i, 'val') - ba(a, 'val'):+.3f}".replace("+", "") for i, a in zip(ZOOM_INTEL, zoom_amd())]
    assert row["difference"] == "Intel minus AMD per seed: " + ", ".join(intel_minus_amd)


def test_the_cpu_differences_come_from_unrounded_figures():
    gaps = {split: [abs(ba(intel, split) - ba(amd, split)) for intel, amd in zip(ZOOM_INTEL, zoom_amd())]
            for split in ("val", "test")}
    expected = (f"by {f3(min(gaps['val']))}-{f3(max(gaps['val']))} on val and "
                f"{f3(min(gaps['test']))}-{f3(max(gaps['test']))} on test")
    assert expected == "by 0.007-0.016 on val and 0.008-0.026 on test"  # 0.0263 (rounded ones give 0.027)
    assert expected in prose()
    amd, intel = result("white_balance_0.1_repro_seed42.amd.json"), WB_INTEL[0]
    wb_gap = (f"#46's seed 42 by {f3(ba(amd, 'val') - ba(intel, 'val'))} on val and "
              f"{f3(amd['test_read_after_commit']['balanced_accuracy'] - ba(intel, 'test'))} on test")
    assert wb_gap in prose()


def test_seven_runs_of_zoom_0_2_on_both_cpus():
    amd = [ba(r, "test") for r in zoom_amd()] + [ba(result("zoom_0.2_vs_zoom_0.1.amd.json")["runs"]["seed3"], "test")]
    assert f"over its seven runs on both CPUs: {mean_sd(amd + [ba(r, 'test') for r in ZOOM_INTEL])}" in prose()


def test_rows_46_and_57_are_the_three_intel_seeds_of_white_balance_0_1():
    val, test = [ba(r, "val") for r in WB_INTEL], [ba(r, "test") for r in WB_INTEL]
    paired_val = [ba(w, "val") - ba(z, "val") for w, z in zip(WB_INTEL, ZOOM_INTEL)]
    paired_test = [ba(w, "test") - ba(z, "test") for w, z in zip(WB_INTEL, ZOOM_INTEL)]
    rows = table()
    assert rows[46]["val"].startswith(mean_sd(val) + " ")
    assert rows[46]["difference"].startswith(f"{mean_sd(paired_val, signed=True)} against #42")
    assert rows[46]["test"].startswith(f"{mean_sd(test)} (paired {mean_sd(paired_test, signed=True)}; "
                                       f"seed 42: {f3(test[0])})")
    assert rows[57]["val"] == f"**{mean_sd(val)}**"
    ci = WB_INTEL[0]["test"]["balanced_accuracy_ci95"]
    assert rows[57]["test"] == (f"**{mean_sd(test)}** (seed 42 on the Intel: {f3(test[0])}, 95% CI "
                                f"{f3(ci[0])}-{f3(ci[1])}; the committed run is #58)")


def test_row_58_is_the_committed_run_in_metrics():
    val, test = metrics("val.json"), metrics("test.json")
    record = result("white_balance_0.1_repro_seed42.amd.json")
    assert record["test_read_after_commit"]["balanced_accuracy"] == test["balanced_accuracy"]
    assert record["val"]["balanced_accuracy"] == val["balanced_accuracy"]
    row = table()[58]
    assert row["val"] == (f"{f3(val['balanced_accuracy'])} (one run; 95% CI {f3(val['balanced_accuracy_ci95_low'])}-"
                          f"{f3(val['balanced_accuracy_ci95_high'])})")
    assert row["test"] == (f"{f3(test['balanced_accuracy'])} (95% CI {f3(test['balanced_accuracy_ci95_low'])}-"
                           f"{f3(test['balanced_accuracy_ci95_high'])})")
    gap = ba(record, "val") - ba(WB_INTEL[0], "val")
    assert row["difference"].startswith(f"Intel seed 42 (#57): {gap:+.3f} on val")


def test_the_committed_run_against_the_intel_seeds():
    """Where the committed run's figures fall among the Intel seeds of its configuration."""
    val, test = metrics("val.json")["balanced_accuracy"], metrics("test.json")["balanced_accuracy"]

    def where(x, seeds):
        word = "above each of" if x > max(seeds) else "below each of" if x < min(seeds) else "within"
        return f"{word} the Intel seeds' {', '.join(map(f3, seeds))}"

    intel_val, intel_test = [ba(r, "val") for r in WB_INTEL], [ba(r, "test") for r in WB_INTEL]
    assert f"Validation {f3(val)}, {where(val, intel_val)} (#57); test {f3(test)}, {where(test, intel_test)}" in prose()
    assert where(test, intel_test).startswith("above")  # 0.740 against 0.730, 0.692, 0.721


def test_what_the_prior_trades_is_the_committed_runs():
    test, val = metrics("test.json"), metrics("val.json")
    before = result("zoom_0.2_repro_seed42.intel.json")["committed"]  # #35's seed 42, the AMD run committed then
    nv, nv_before = test["per_class"]["nv"]["recall"], before["test"]["recall"]["nv"]
    assert (f"the committed run (#58) has test accuracy {f3(test['accuracy'])} and nv test recall {nv:.2f}, "
            f"against 0.756 and {nv_before:.2f}") in prose()  # 0.756: git show 05d5d54:metrics/test.json
    assert (f"on val is {f3(val['operating_point']['mel_specificity'])} "
            f"({f3(before['val']['operating_point']['mel_specificity'])} before)") in prose()

    def specificities(runs):
        return ", ".join(f3(r["val"]["operating_point"]["mel_specificity"]) for r in runs)

    assert f"{specificities(WB_INTEL)} (#46) against {specificities(ZOOM_INTEL)} (#42)" in prose()


# int8 rows: row -> (run of the result file, candidate)
INT8_ROWS = {
    64: (0, "int8, 1000 images, float DEPTHWISE_CONV_2D"),
    65: (0, "int8, 1000 images, float DEPTHWISE_CONV_2D+SOFTMAX"),
    66: (0, "int8, 1000 images, float DEPTHWISE_CONV_2D+MEAN+FULLY_CONNECTED+SOFTMAX"),
    67: (0, "int8, 2000 images, float DEPTHWISE_CONV_2D"),
    68: (0, "int8, 500 images x4 flips, float DEPTHWISE_CONV_2D"),
    69: (1, "int8, 1000 images, float DEPTHWISE_CONV_2D + 3 worst"),
    70: (1, "int8, 1000 images, float DEPTHWISE_CONV_2D + 6 worst"),
    71: (1, "int16, 1000 images, float none"),
    72: (1, "dynamic"),
    73: (1, "float16"),
    74: (2, "int8, 1000 images, float DEPTHWISE_CONV_2D+conv_pw_1+conv_pw_2"),
    75: (2, "int8, 1000 images, float DEPTHWISE_CONV_2D+conv_pw_1+conv_pw_2+conv_pw_3"),
    76: (2, "int8, 1000 images, float DEPTHWISE_CONV_2D+conv_pw_1+conv_pw_2+conv_pw_3+conv_pw_4"),
    77: (2, "int8, 1000 images, float conv_dw_1+conv_pw_1+conv_dw_2+conv_pw_2+conv_dw_3+conv_pw_3+conv_dw_4+conv_pw_4"),
}


@pytest.mark.parametrize("number", sorted(INT8_ROWS))
def test_int8_rows(number):
    runs = result("int8_setting_for_0.95_agreement.amd.json")["runs"]
    run, name = INT8_ROWS[number]
    candidate, baseline = runs[run]["candidates"][name], runs[0]["candidates"][INT8_ROWS[64][1]]
    agree, ba_val = candidate["agreement"], candidate["balanced_accuracy"]
    row = table()[number]
    if number == 64:
        assert row["val"].startswith(f"val agreement {f3(agree)} ({round(agree * VAL_IMAGES):,} of {VAL_IMAGES:,}), "
                                     f"val BA {f3(ba_val)};")
        return
    assert row["val"].startswith(f"{f3(agree)} ({'val BA ' if number == 65 else ''}{f3(ba_val)})")
    images = round(agree * VAL_IMAGES) - round(baseline["agreement"] * VAL_IMAGES)
    assert row["difference"].startswith("±0 images" if images == 0 else f"{images:+d} image")


def test_row_81_test_agreement_is_the_committed_exports():
    export = metrics("export.json")
    assert export["int8_float_layers"] == ["conv_pw_1", "conv_pw_2", "conv_pw_3", "conv_pw_4"]  # row 81's setting
    assert table()[81]["test"].startswith(f"test agreement {f3(export['int8']['agreement'])}, read after the choice")


def test_row_82_is_the_committed_run():
    run, val, test = result("reference_run_after_refactor.amd.json"), metrics("val.json"), metrics("test.json")
    assert run["val"]["balanced_accuracy"] == val["balanced_accuracy"]
    assert run["test"]["balanced_accuracy"] == test["balanced_accuracy"]
    row = table()[82]
    assert f3(test["balanced_accuracy"]) in row["test"] and f3(run["export_int8_test"]["agreement"]) in row["test"]
    assert f"{run['elapsed_s'] / 60:.1f} min" in row["configuration"]


@pytest.mark.parametrize("number, name", [
    (30, "conv_dw_11_vs_all.amd.json"), (31, "conv_dw_11_128px_15ep_vs_all.amd.json"),
    (32, "rotation_0_vs_180.amd.json"), (33, "photo_aspect_4_3_vs_square.amd.json"),
    (35, "zoom_0.2_vs_zoom_0.1.amd.json"),
])
def test_amd_three_seed_rows_and_their_paired_differences(number, name):
    runs, baseline = result(name)["runs"], result("160px_10ep_zoom_0.1.amd.json")["runs"]
    seeds = ("seed1", "seed2", "seed3")
    row = table()[number]
    assert row["val"] == mean_sd([ba(runs[s], "val") for s in seeds]) or row["val"].startswith(
        f"**{mean_sd([ba(runs[s], 'val') for s in seeds])}")
    paired = [ba(runs[s], "val") - ba(baseline[s], "val") for s in seeds]
    plain = [runs[s]["val"]["balanced_accuracy_plain"] - baseline[s]["val"]["balanced_accuracy_plain"] for s in seeds]
    if number == 31:  # its cell has no plain argmax
        assert row["difference"] == mean_sd(paired, signed=True)
    else:
        plain_figure = mean_sd(plain, signed=True)
        assert row["difference"].startswith(f"{mean_sd(paired, signed=True)} (plain argmax {plain_figure})")


@pytest.mark.parametrize("number, view, places", [(36, "none", 4), (37, "dihedral", 3), (38, "flips@176", 3),
                                                  (39, "flips@192", 3), (40, "dihedral@192", 3)])
def test_test_time_view_rows(number, view, places):
    models = result("test_time_views.amd.json")["models"].values()
    row = table()[number]
    assert row["val"] == mean_sd([m[view] for m in models])
    assert row["difference"] == mean_sd([m[view] - m["flips"] for m in models], places, signed=True)


DEPTH, TRADES = "depth_size_epochs.gpu.json", "trades_at_cpu_cost.gpu.json"


@pytest.mark.parametrize("number, name, config", [
    (16, DEPTH, "all_128px_15ep"), (17, DEPTH, "all_192px_15ep"), (18, DEPTH, "all_160px_10ep"),
    (19, DEPTH, "conv_dw_6_192px_10ep"), (20, DEPTH, "conv_dw_6_160px_15ep"), (21, DEPTH, "conv_dw_6_128px_15ep"),
    (24, TRADES, "all_160px_10ep"), (25, TRADES, "all_192px_6ep"), (26, TRADES, "all_192px_8ep_target_per_class750"),
    (27, TRADES, "all_160px_13ep_target_per_class750"), (28, TRADES, "all_160px_10ep_lr4e-4"),
    (29, TRADES, "all_160px_10ep_lr1e-4"),
])
def test_gpu_sweep_rows(number, name, config):
    runs = result(name)["configs"][config]["runs"].values()
    assert table()[number]["val"].startswith(mean_sd([ba(r, "val") for r in runs]))


def test_every_result_file_is_indexed_and_every_named_file_exists():
    named = set()
    for row in table().values():
        named |= set(re.findall(r"`([^`]+\.json)`", row["result file"]))
    in_results = {path.name for path in RESULTS.glob("*.json")}
    assert in_results <= named
    assert all((RESULTS / name).exists() or (ROOT / name).exists() for name in named)


def test_dedupe_page_counts_are_the_committed_datas():
    """docs/dedupe.md's counts on the mirror: metrics/data.json of the committed data."""
    data = metrics("data.json")
    text = " ".join((ROOT / "docs" / "dedupe.md").read_text().split())
    assert f"({data['images'] + data['exact_duplicates']['removed']:,} images at 200x150)" in text
    assert (f"finds {data['exact_duplicates']['found']} exact pairs and {data['near_duplicates']['found']} "
            f"near-duplicate pairs, which merge {'one pair' if data['merged_lesion_groups'] == 1 else None} "
            "of lesion ids") in text


def test_the_page_names_only_files_that_exist():
    """Every file path on the page is in the tree (a retired one is named by `git show REV:PATH`)."""
    for path in set(re.findall(r"(?<![\w:/.-])[\w./-]+/[\w./-]+\.(?:py|md|json|yaml)\b", PAGE.read_text())):
        assert (PAGE.parent / path if path.startswith("../") else ROOT / path).exists(), path


def strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("name", sorted(path.name for path in RESULTS.glob("*.json")))
def test_result_files_name_only_files_and_rows_that_exist(name):
    """Code, docs and result files a record names are in the tree; 'docs/experiments.md #N' is a row."""
    rows = table()
    for text in strings(result(name)):
        for path in re.findall(r"(?<![\w:/.-])[\w./-]+\.(?:py|md|json)\b", text):  # not `git show REV:PATH`
            if path.startswith(("metrics/", "models/", "data/")):  # the run's pipeline outputs, not the tree's
                continue
            places = [ROOT] if "/" in path else [RESULTS, ROOT / "experiments", ROOT / "benchmarks"]
            assert any((place / path).exists() for place in places), f"{name}: {path} in {text!r}"
        for number in re.findall(r"docs/experiments\.md #(\d+)", text):
            assert int(number) in rows, f"{name}: no row {number}"
        headings = [line[3:] for line in PAGE.read_text().splitlines() if line.startswith("## ")]
        for section in re.findall(r"(?<![:\w/])docs/experiments\.md,? \(?'([^']+)'", text):  # not `git show REV:`
            assert section in headings, f"{name}: no section {section!r} in docs/experiments.md"


def test_figures_without_a_result_file_are_marked_unrecorded():
    rows = table()
    for number in (60, 61, 62):
        assert rows[number]["difference"].startswith("unrecorded: ")
        assert rows[number]["result file"].startswith("none")
    assert "unrecorded: cooler white balance keeps" in rows[63]["difference"]
    assert "test ECE 0.051 (unrecorded)" in rows[59]["difference"]


METADATA = "metadata_weight_and_regularization.amd.json"


def test_metadata_rows_are_the_grid_over_three_seeds_and_the_adopted_one_is_committed():
    """#83 on: one row per configuration of the result file, in its order, val BA mean ± sd over
    its seeds and the paired difference to the image alone (then the NLL of the shown
    probabilities); the last row: the adopted configuration deciding on the shown order instead."""
    configs = result(METADATA)["configurations"]
    rows = [row for row in table().values() if METADATA in row["result file"]]
    assert len(rows) == len(configs) + 1
    base = configs["image only"]["per_seed"]
    adopted = []
    for row, (name, config) in zip(rows, configs.items()):
        runs = config["per_seed"]
        assert len(runs) >= 3
        assert row["val"] == mean_sd([ba(r, "val") for r in runs.values()])
        nll = f"(NLL {statistics.mean(r['val']['shown_nll'] for r in runs.values()):.3f})"
        if name != "image only":
            paired = [ba(runs[s], "val") - ba(base[s], "val") for s in runs]
            assert row["difference"] == f"{mean_sd(paired, signed=True)} {nll}"
        else:
            assert row["difference"] == f"baseline {nll}"
        if row["decision"].startswith("adopted"):
            adopted.append(config)
    [config] = adopted
    params = (ROOT / "params.yaml").read_text().replace(".0 ", " ")  # 1.0 as :g writes it
    assert f"metadata_weight: {config['weight']:g} " in params
    assert f"regularization: {config['regularization']:g} " in params
    runs = config["per_seed"]
    shown = [r["val"]["shown_argmax_balanced_accuracy"] for r in runs.values()]
    assert rows[-1]["val"] == mean_sd(shown)
    assert rows[-1]["difference"] == mean_sd([s - ba(r, "val") for s, r in zip(shown, runs.values())], signed=True)


def test_row_110_is_the_committed_run_with_metadata():
    run, val, test = result("reference_run_with_metadata.amd.json"), metrics("val.json"), metrics("test.json")
    for split, figures in (("val", val), ("test", test)):
        assert run[split]["balanced_accuracy"] == figures["balanced_accuracy"]
        assert run[split]["with_metadata"]["balanced_accuracy"] == figures["with_metadata"]["balanced_accuracy"]
    row = table()[110]
    assert f"{run['elapsed_s'] / 60:.1f} min" in row["configuration"]
    assert row["val"].startswith(f3(val["with_metadata"]["balanced_accuracy"]))
    for figure in (test["with_metadata"]["balanced_accuracy"], test["balanced_accuracy"]):
        assert f3(figure) in row["test"]
