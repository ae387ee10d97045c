"""Command `predict`: the most probable classes and the decision for each JPEG or PNG image.

    python -m stages.predict [--model models/model.keras] [--decision FILE] [--json | --jsonl
        [--output FILE [--resume]]] [--list FILE] [--age N] [--sex SEX] [--site SITE]
        [--metadata FILE.csv] [IMAGE_OR_FOLDER ...]

Input: image files, folders (walked recursively for .jpg, .jpeg and .png files) and a file listing
paths, with the model and the decision rule evaluate stored beside it; optional patient metadata,
the flags for every image or a CSV row per image (matched by file stem). Output: a table, or with
--json one JSON list, on stdout; with --jsonl one JSON object per image and line, written as each
batch is done (memory stays bounded whatever the count), to stdout or --output FILE, which
--resume continues. A front end to stages/lib/prediction.py (decoding as training did, the stored
rule; `stages.serve` answers through it too) and stages/lib/archive.py (inputs, metadata, JSON lines).
Invariant: a bad file or metadata row gets its own error, an odd name is escaped, and the other
images' results are always given. Exit status: 0 all predicted, 1 some image failed, 2 usage error
(one line on stderr saying what to do), 130 interrupted (the lines written so far are whole).
Cases and tests: docs/faults.md.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.lib import archive, prediction
from stages.lib.cli import command_parser
from stages.lib.dataset import CLASS_NAMES
from stages.lib.metadata import AGE_LIMIT, SEXES, SITES
from stages.lib.prediction import FORMATS, NOTICE, SMALL_FRACTION, UsageError
from stages.lib.text import printable

EXIT_STATUS = ("exit status: 0 all images predicted; 1 some image failed (the others' results are still "
               "given); 2 usage error (bad arguments or metadata flags; model, decision, list, metadata or output "
               "file); 130 interrupted "
               "(--jsonl: the lines written so far are whole, --resume continues)")


def decision_text(result: dict[str, Any]) -> str:
    """The table's decision cell: the class, and the melanoma score (p(mel) before calibration)
    against the operating point's threshold."""
    said = result.get("decision", "")
    if "mel_probability" in result and "mel_threshold" in result and result.get("in_distribution", True):
        p, threshold = result["mel_probability"], result["mel_threshold"]
        said += f" (mel score {p:.1%} {'>=' if p >= threshold else '<'} threshold {threshold:.1%})"
    return said


def all_warnings(result: dict[str, Any]) -> list[str]:
    """The result's warnings, the out-of-distribution one first."""
    found = list(result.get("warnings", []))
    if result.get("in_distribution") is False:
        found.insert(0, f"not a lesion this model can judge: out-of-distribution score {result['ood_score']:,.1f} "
                        "(unlike the dermoscopy images it was trained on); its classes mean nothing here")
    return found


def metadata_text(result: dict[str, Any]) -> str:
    """The table's line on the patient metadata the answer used."""
    used = result.get("metadata") or {}
    if not used:
        return "metadata: none used (decided from the image alone)"
    return "metadata used: " + ", ".join(f"{field} {value:g}" if field == "age" else f"{field} {value}"
                                         for field, value in used.items())


def format_table(results: list[dict[str, Any]], metadata: bool = False) -> str:
    """A table for people: per image its classes, decision, why, the metadata used (when
    `metadata` was given) and warnings, then the notice.

    Every name and message goes through `printable`: a file name cannot restyle the terminal.
    """
    names = [printable(r["image"]) for r in results]
    width = max([len("image")] + [len(n) for n in names])
    name_width = max(len(n) for n in CLASS_NAMES.values())
    lines = [f"{'image':<{width}}  #  {'dx':<5}  {'name':<{name_width}}  probability  decision"]
    for name, result in zip(names, results):
        if "error" in result:
            lines.append(f"{name:<{width}}  error: {printable(result['error'])}")
            continue
        for rank, cls in enumerate(result["top"], 1):
            image = name if rank == 1 else ""
            said = decision_text(result) if rank == 1 else ""
            lines.append(f"{image:<{width}}  {rank}  {cls['dx']:<5}  {cls['name']:<{name_width}}  "
                         f"{cls['probability']:>11.1%}  {said}".rstrip())
        if result.get("reason"):  # why the decision is what it is, in words true of the figures shown
            lines.append(f"{'':<{width}}  why: {printable(result['reason'])}")
        if metadata:
            lines.append(f"{'':<{width}}  {printable(metadata_text(result))}")
        lines += [f"{'':<{width}}  warning: {printable(text)}" for text in all_warnings(result)]
    failed = sum("error" in r for r in results)
    lines += ["", f"{len(results)} image(s), {failed} failed.", NOTICE]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None):
    parser = command_parser(
        main, exit_status=EXIT_STATUS,
        description="Print the 3 most probable HAM10000 classes (dx code, name, probability) and the decision "
                    f"for each {' or '.join(FORMATS)} image. " + NOTICE)
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_FOLDER",
                        help=f"{' or '.join(FORMATS)} files (other formats are refused), any size or mode; "
                             f"a side under {SMALL_FRACTION * 100:.0f}%% of the model's input side gets a warning. "
                             f"A folder is searched recursively for files named *{', *'.join(archive.SUFFIXES)} "
                             "(any case; hidden ones skipped)")
    parser.add_argument("--list", type=Path, metavar="FILE",
                        help="also predict the files and folders it lists, one path per line (after the arguments)")
    parser.add_argument("--model", type=Path, default=prediction.DEFAULT_MODEL,
                        help=f"Keras model (default: {prediction.DEFAULT_MODEL})")
    parser.add_argument("--decision", type=Path, default=None,
                        help="decision rule chosen on validation by evaluate (default: decision.json beside the model)")
    parser.add_argument("--age", metavar="N", help=f"the patient's age in years, 0 to {AGE_LIMIT} (every image)")
    parser.add_argument("--sex", metavar="SEX", help=f"the patient's sex: {' or '.join(SEXES)} (every image)")
    parser.add_argument("--site", metavar="SITE", help="the lesion's body site (every image), a HAM10000 "
                        f"localization: {', '.join(SITES)} (quote a name with a space)")
    parser.add_argument("--metadata", type=Path, metavar="FILE.csv",
                        help="per image, from a CSV with HAM10000's columns image_id, age, sex, localization "
                             "(image_id = the file name without its extension; others optional; extra columns "
                             "ignored); an image without a row is predicted from the image alone. Not with "
                             "--age/--sex/--site. Any metadata is optional")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON list on stdout (the notice goes to stderr)")
    output.add_argument("--jsonl", action="store_true",
                        help="one JSON object per image and line, written as each batch of "
                             f"{prediction.BATCH_SIZE} is done (the notice goes to stderr)")
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help="with --jsonl: write the lines to FILE (refused if it exists, unless --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="with --output: skip the images FILE already answers, append the others (a last "
                             "line cut off mid-write is written again)")
    args = parser.parse_args(argv)
    if not args.images and args.list is None:
        parser.error("name at least one IMAGE_OR_FOLDER, or --list FILE")
    if args.output is not None and not args.jsonl:
        parser.error("--output needs --jsonl")
    if args.resume and args.output is None:
        parser.error("--resume needs --output FILE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter off the terminal
    for stream in (sys.stdout, sys.stderr):  # an unencodable character is escaped, never fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        given = archive.metadata_source(args.age, args.sex, args.site, args.metadata)
        paths = archive.image_paths(args.images, args.list)
        predictor = prediction.load(args.model, args.decision)
        out, done = archive.open_output(args.output, args.resume) if args.output else (sys.stdout, set())
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    batches = prediction.describe_batches(predictor, archive.pending(paths, done), metadata=given)
    if args.jsonl:
        print(NOTICE, file=sys.stderr)
        try:
            written, failed = archive.write_lines(batches, out)
        except KeyboardInterrupt:
            print("interrupted: the lines written so far are whole; --resume continues", file=sys.stderr)
            return 130
        finally:
            if out is not sys.stdout:
                out.close()
        if args.output:
            print(f"{written} image(s) written to {printable(str(args.output))}, {failed} failed"
                  + (f"; {len(done)} already there" if args.resume else ""), file=sys.stderr)
        return 1 if failed else 0
    results = [r for batch in batches for r in batch]
    if args.json:
        print(json.dumps(results, indent=2))
        print(NOTICE, file=sys.stderr)
    else:
        print(format_table(results, metadata=given is not None), end="")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
