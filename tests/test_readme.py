"""The README against the repository it describes."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_layout_names_every_module_and_package_of_the_library():
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    named = set(re.findall(r"`([\w/]+)`", layout))
    library = REPO / "jaxseg"
    modules = {p.stem for p in library.glob("*.py") if p.stem != "__init__"}
    packages = {f"{p.name}/" for p in library.iterdir()
                if p.is_dir() and not p.name.startswith((".", "__"))}
    assert modules | packages <= named, sorted((modules | packages) - named)
    # and names nothing that is gone: a module, a folder of the library or of the repository
    gone = {n for n in named if not any(p.exists() for p in (
        REPO / n, library / n, library / f"{n}.py"))}
    assert not gone, sorted(gone)


def test_launch_readme_names_every_launch_script():
    text = (REPO / "launch" / "README.md").read_text()
    scripts = {p.name for p in (REPO / "launch").iterdir()
               if p.is_file() and p.name != "README.md" and not p.name.startswith(".")}
    assert {s for s in scripts if f"`{s}`" not in text and f"launch/{s}" not in text} == set()


READMES = ("README.md", "launch/README.md")


def test_every_flag_of_a_readme_command_is_one_its_module_defines():
    # By the module's source (absl DEFINE_*("name") or argparse "--name"), with the helpers that
    # define the shared model and multi-process flags: no JAX start-up per module.
    helpers = "".join((REPO / "jaxseg" / f).read_text() for f in ("arg_types.py", "distributed.py"))
    unknown = []
    for readme in READMES:
        # To the end of the code span, line, comment or table cell.
        for module, sub, rest in re.findall(r"python -m jaxseg\.(\w+)(?: (\w+))?([^`\n#|]*)",
                                            (REPO / readme).read_text()):
            package = REPO / "jaxseg" / module
            source = ((package / "__main__.py") if package.is_dir() else
                      package.with_suffix(".py")).read_text() + helpers
            if module == "bench" and sub == "infer":
                source += (REPO / "jaxseg" / "bench_infer.py").read_text()
            for flag in re.findall(r"--(\w+)(?![\w.])", rest):  # not --config.FIELD overrides
                if not re.search(rf"""DEFINE_\w+\(\s*"{flag}"|["']--{flag}["']""", source):
                    unknown.append(f"{readme}: python -m jaxseg.{module} --{flag}")
    assert not unknown, unknown


def test_every_option_of_a_readme_launch_command_is_one_its_script_takes():
    # `launch/X.py --flag` by argparse's "--flag"; `launch/X.sh --flag` by a case pattern
    # (`--flag)`, `-n|-d)`) or a getopts letter. Up to a lone `--` (the rest goes to
    # jaxseg.train), `&&` or a comment; config overrides (--config.FIELD) are jaxseg.train's.
    unknown = []
    for readme in READMES:
        text = (REPO / readme).read_text().replace("\\\n", " ")  # continued command lines
        for script, rest in re.findall(r"launch/(\w+\.(?:py|sh))([^`\n#&;]*)", text):
            source = (REPO / "launch" / script).read_text()
            getopts = re.search(r'getopts "([^"]*)"', source)
            for word in (w.strip("[]|") for w in rest.split()):
                if word == "--":
                    break
                if not (flag := re.fullmatch(r"(--?[a-zA-Z][\w-]*)(?:=.*)?", word)):
                    continue
                flag = flag.group(1)
                known = (re.search(rf"""["']{flag}["']""", source) if script.endswith(".py") else
                         re.search(rf"(?<![\w-]){flag}[|)]", source)
                         or (getopts and len(flag) == 2 and flag[1] in getopts.group(1)))
                if not known:
                    unknown.append(f"{readme}: launch/{script} {flag}")
    assert not unknown, unknown


def test_every_config_field_the_readmes_name_exists():
    from configs import default

    config = default.get_config()
    not_fields = {"optim.learnig_rate",  # the sweep's example of a misspelt field
                  "train.log"}  # a sweep trial's log file
    unknown = []
    for readme in READMES:
        text = (REPO / readme).read_text()
        for field in set(re.findall(r"(?<![\w/.-])((?:data|model|loss|optim|train|eval)(?:\.\w+)+)",
                                    text)) - not_fields:
            value = config
            for part in field.split("."):
                if not hasattr(value, "keys") or part not in value:
                    unknown.append(f"{readme}: {field}")
                    break
                value = value[part]
    assert not unknown, sorted(unknown)


def test_the_split_sizes_the_readme_gives_are_the_built_splits(real_data_dir):
    """The Data table's train/validation/test counts, the Results columns' test counts and the
    half-data run's slice, against the splits built from the real data."""
    from jaxseg import datasets

    text = (REPO / "README.md").read_text()
    sizes = {name: datasets.split_sizes(name, data_dir=real_data_dir)
             for name in datasets.MANUAL_SUBDIRS}
    table = {name: [int(n) for n in counts] for name, *counts in re.findall(
        r"^\| `(\w+)` \|[^|\n]*\| (\d+) \| (\d+) \| (\d+) \|$", text, re.MULTILINE)}
    assert table == {name: [s["train"], s["validation"], s["test"]] for name, s in sizes.items()}
    assert re.findall(r"portraits test IoU \((\d+)\)|CCP test IoU \((\d+)\)", text) == [
        (str(sizes["portrait_segmentation"]["test"]), ""), ("", str(sizes["ccp_person"]["test"]))]
    half = re.search(r"train_split='train\[:50%\]'` \((\d+) portraits, (\d+) CCP photos\)", text)
    assert half and [int(n) for n in half.groups()] == [
        len(datasets.data_source(name, "train[:50%]", data_dir=real_data_dir))
        for name in datasets.MANUAL_SUBDIRS]


def test_the_exclusions_the_readme_gives_are_the_build_reports(real_data_dir):
    """The Data section's counts of portraits masks without a photo (and of those on the
    authors' lists), its train-list repeats of test photos and CCP's empty annotation, against
    the build reports of the real data."""
    from jaxseg import datasets

    text = " ".join((REPO / "README.md").read_text().split())  # as one line: wrapped anywhere
    portraits = datasets.build_report("portrait_segmentation", data_dir=real_data_dir)
    counts = portraits["counts"]
    said = re.search(r"Portraits: (\d+) masks without a photo \((\d+) of them ids on the "
                     r"authors' train and test lists\)", text)
    assert said and [int(n) for n in said.groups()] == [counts["masks_without_photo"], sum(
        e["reason"].startswith("mask without photo (id in") for e in portraits["excluded"])]
    pairs = re.search(r"the authors' train list repeats \w+ test portraits \(([^)]*)\)", text)
    repeats = {re.search(r"(\d+)\.jpg$", e["file"]).group(1): e["reason"].rsplit(" ", 1)[1]
               for e in portraits["excluded"] if e["reason"].startswith("the same photo as test")}
    assert pairs and dict(re.findall(r"(\d+) = (?:test )?(\d+)", pairs.group(1))) == repeats
    ccp = datasets.build_report("ccp_person", data_dir=real_data_dir)["excluded"]
    said = re.search(r"CCP: the empty annotation (\d+) is excluded", text)
    assert said and [e["file"] for e in ccp] == [f"annotations/pixel-level/{said.group(1)}.mat"]
