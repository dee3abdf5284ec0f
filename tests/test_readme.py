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


def test_launch_readme_names_every_launch_script():
    text = (REPO / "launch" / "README.md").read_text()
    scripts = {p.name for p in (REPO / "launch").iterdir()
               if p.is_file() and p.name != "README.md" and not p.name.startswith(".")}
    assert {s for s in scripts if f"`{s}`" not in text and f"launch/{s}" not in text} == set()
