"""`python -m jaxseg.datasets build NAME... [--manual_dir DIR] [--data_dir DIR] [--folder DIR]`.

Prepares datasets like `tfds build` does, then prints split sizes and where the build report is.
TFDS 4.9.10's own `tfds` command imports apache-beam and mlcroissant, which would downgrade
jaxseg's numpy and protobuf; in an environment that has them,
`tfds build --imports jaxseg.datasets NAME --manual_dir DIR` builds the same data (checked).
"""
import argparse
import json
import os
import pathlib

from jaxseg import datasets


def _parser():
    p = argparse.ArgumentParser(prog="python -m jaxseg.datasets", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["build"])
    p.add_argument("names", nargs="+", choices=datasets.DATASETS)
    p.add_argument("--manual_dir", help="the dataset's folder, or one holding portraits/ and "
                   "ccp/ (default: $JAXSEG_MANUAL_DIR/<portraits|ccp>)")
    p.add_argument("--data_dir", help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    p.add_argument("--folder", help="person_folder: the folder with images/ and masks/")
    p.add_argument("--on_bad", choices=["skip", "error"], default="skip",
                   help="a bad file (unreadable, mismatched, unpaired in your folder) is skipped "
                        "and listed in the build report, or stops the build (default: "
                        "%(default)s)")
    return p


def main(argv=None):
    """Builds each named dataset and prints its split sizes and build-report counts."""
    p = _parser()
    args = p.parse_args(argv)
    if "person_folder" in args.names and not args.folder:  # before minutes of building the others
        p.error("person_folder needs --folder: a folder with images/ and masks/")
    if args.folder and "person_folder" not in args.names:  # else ignored without a word
        p.error("--folder is read by person_folder only: add it to the names, or leave --folder out")
    if args.manual_dir and not set(args.names) & datasets.MANUAL_SUBDIRS.keys():  # else ignored too
        p.error(f"--manual_dir is read by {' and '.join(datasets.MANUAL_SUBDIRS)} only: "
                "person_folder reads --folder")
    if args.manual_dir:
        # A mistyped one was warned of and replaced by a download of the public archive.
        args.manual_dir = os.path.expanduser(args.manual_dir)  # --manual_dir=~/data: no shell
        if not os.path.isdir(args.manual_dir):
            p.error(f"--manual_dir {args.manual_dir}: no such folder")
        # A folder without a dataset's files (one of them missing, or the wrong level named) was
        # warned of, and the public archive downloaded in its place as well.
        for name in sorted(set(args.names) & datasets.MANUAL_SUBDIRS.keys()):
            builder = datasets.builder(name, data_dir=args.data_dir)
            folder, sub = pathlib.Path(args.manual_dir), datasets.MANUAL_SUBDIRS[name]
            if not (builder.find_layout(folder) or builder.find_layout(folder / sub)):
                p.error(f"--manual_dir {folder} holds neither {name}'s files "
                        f"({', '.join(builder.LAYOUT)}) nor {sub}/ or {builder.ARCHIVE_DIR}/ "
                        f"holding them (nearest: {builder.lacking(folder, folder / sub)})")
    for name in args.names:
        try:
            builder = datasets.prepare(name, data_dir=args.data_dir, folder=args.folder,
                                       on_bad=args.on_bad, manual_dir=args.manual_dir)
        except (ValueError, OSError) as e:  # missing or bad data, wrong layout, unwritable data dir
            raise SystemExit(f"error: {e}") from None
        report = pathlib.Path(builder.data_dir) / datasets.REPORT_FILE
        print(json.dumps({"dataset": name, "splits": builder.split_sizes(),
                          "counts": builder.report().get("counts", {}), "report": str(report)}))


if __name__ == "__main__":
    main()
