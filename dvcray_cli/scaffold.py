"""``dvcray scaffold``: start a DVC + Ray project from a template that works at once."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dvcray_cli import gitutil, params
from dvcray_cli.errors import UsageError
from dvcray_cli.packaged import templates_dir

META = "template.yaml"
SKIP = {META, "__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


@dataclass
class Template:
    name: str
    description: str
    path: Path
    next_steps: list[str] = field(default_factory=list)


@dataclass
class ScaffoldResult:
    template: str
    dest: Path
    files: list[str]
    overwritten: list[str]
    created_repo: bool
    dvc_initialized: bool
    next_steps: list[str]


def list_templates() -> list[Template]:
    """Every template that ships with dvcray, by name."""
    found = []
    for path in sorted(templates_dir().iterdir()):
        meta = path / META
        if meta.is_file():
            data = yaml.safe_load(meta.read_text()) or {}
            found.append(Template(path.name, data.get("description", ""), path,
                                  list(data.get("next_steps", []))))
    return found


def get_template(name: str) -> Template:
    templates = list_templates()
    for template in templates:
        if template.name == name:
            return template
    known = ", ".join(t.name for t in templates)
    raise UsageError(f"Unknown template '{name}'. Known templates: {known}.",
                     "See them described with: dvcray scaffold --list")


def _out_name(rel: Path) -> Path:
    # Dotfiles are stored as dot-NAME so they do not act on dvcray's own repo
    # (a template's .gitignore would hide files from our git and our wheel).
    return Path(*[("." + p[4:]) if p.startswith("dot-") else p for p in rel.parts])


def render(template: Template, context: dict) -> dict[str, bytes]:
    """The template's files as ``{relative path: content}``; ``*.jinja`` rendered strictly."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    files: dict[str, bytes] = {}
    for src in sorted(template.path.rglob("*")):
        rel = src.relative_to(template.path)
        if not src.is_file() or SKIP.intersection(rel.parts) or src.suffix == ".pyc":
            continue
        out = _out_name(rel)
        if src.suffix == ".jinja":
            text = env.from_string(src.read_text()).render(**context)
            files[out.with_suffix("").as_posix()] = text.encode()
        else:
            files[out.as_posix()] = src.read_bytes()
    return files


def _override_params(files: dict[str, bytes], sets: list[str], template: str) -> None:
    """Apply ``--set`` to the rendered params files, checked before anything is written."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, content in files.items():
            if rel.endswith((".yaml", ".yml", ".json", ".toml", ".py")):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(content)
        grouped = params.check(root, sets, flag="--set", where=f"the {template} template")
        if params.is_sweep(sets):
            raise UsageError("--set takes one value per key, not a sweep.")
        params.apply(root, grouped)
        for rel in grouped:
            files[rel] = (root / rel).read_bytes()


def scaffold(name: str, dest: Path | None = None, sets: list[str] | None = None,
             force: bool = False) -> ScaffoldResult:
    """Render template ``name`` into ``dest`` and make it a working DVC project.

    Every check happens before the first file is written: an unknown template
    or key, a bad value, files that would be overwritten (unless ``force``),
    and a missing git identity when a new repository must be committed.

    Raises:
        UsageError: with a message that says what to do.
    """
    from dvcray_cli import __version__

    template = get_template(name)
    # Resolved, so it compares equal to git's --show-toplevel (which resolves symlinks).
    dest = (dest or Path.cwd() / name).resolve()
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a folder.", "Choose another DEST.")

    files = render(template, {"project": dest.name, "template": name,
                              "dvcray_version": __version__})
    if sets:
        _override_params(files, sets, name)

    clashes = [rel for rel in files if (dest / rel).exists()]
    blocked = [rel for rel in files if _blocked(dest, rel)]
    if blocked:
        # Not even --force replaces a folder, or a file that stands where a folder must go.
        raise UsageError(f"{dest} has {', '.join(blocked[:8])} in the way: a folder where the "
                         "template has a file, or a file where it has a folder.",
                         "Nothing was written. Move them away or choose another DEST.")
    if clashes and not force:
        shown = ", ".join(clashes[:8]) + (f" and {len(clashes) - 8} more" if len(clashes) > 8 else "")
        raise UsageError(f"{dest} already has {len(clashes)} of the template's files: {shown}.",
                         "Nothing was written. Pass --force to overwrite them, or choose another DEST.")

    root = gitutil.git_root(dest)
    created_repo = root is None
    if created_repo:
        probe = dest if dest.exists() else dest.parent
        while not probe.exists():
            probe = probe.parent
        gitutil.identity(probe)

    for rel, content in files.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        if rel.endswith(".sh"):
            target.chmod(0o755)

    dvc_initialized = False
    if created_repo:
        gitutil.git("init", "-q", cwd=dest)
        if not (dest / ".dvc").is_dir():
            _dvc_init(dest, subdir=False)  # stages DVC's own files (autostage)
            dvc_initialized = True
        # Commit what dvcray wrote, never other files that were already in DEST
        # (and not the template's files that its own .gitignore leaves out).
        ignored = set(gitutil.git("check-ignore", "--", *files, cwd=dest, check=False).splitlines())
        gitutil.git("add", "--", *(rel for rel in files if rel not in ignored), cwd=dest)
        gitutil.git("commit", "-q", "-m", f"Start a DVC + Ray project from dvcray's {name} template",
                    cwd=dest)
    elif gitutil.dvc_root(dest, root) is None:
        _dvc_init(dest, subdir=dest != root)
        dvc_initialized = True

    steps = [s.format(dest=os.path.relpath(dest)) for s in template.next_steps]
    return ScaffoldResult(name, dest, sorted(files), sorted(clashes), created_repo,
                          dvc_initialized, steps)


def _blocked(dest: Path, rel: str) -> bool:
    """True when writing ``rel`` under ``dest`` cannot work: it is a folder, or a parent is a file."""
    target = dest / rel
    if target.is_dir():
        return True
    parents = [dest / part for part in Path(rel).parents if part != Path(".")]
    return any(p.exists() and not p.is_dir() for p in parents)


def _dvc_init(path: Path, subdir: bool) -> None:
    import logging

    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    # DVC logs "Initialized DVC repository. You can now commit..." through handlers
    # that hold the real stdout (redirect_stdout misses them): raise the level instead.
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.WARNING)
    try:
        Repo.init(os.fspath(path), subdir=subdir).close()
    except DvcException as exc:
        raise UsageError(f"dvc init failed in {path}: {exc}",
                         "The template's files were written; fix the cause and run: dvc init") from None
    finally:
        dvc_logger.setLevel(level)
