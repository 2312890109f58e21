"""A wheel of the dvcray this client runs, for the nodes: they install exactly this
code, never a package of that name from an index (DESIGN.md, "Clusters").

The wheel holds the ``dvcray_cli`` package as imported here (an installed wheel's
files, or a source checkout's), the templates and cluster configs that a wheel
carries inside the package, and the installed distribution's metadata (its
dependencies and the ``dvcray`` script). It is built in a few milliseconds, with
fixed timestamps, so the same code gives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path

from dvcray_cli import __version__, files

WHEEL_TAG = "py3-none-any"
_EPOCH = (1980, 1, 1, 0, 0, 0)


def wheel_name() -> str:
    return f"dvcray-{__version__}-{WHEEL_TAG}.whl"


def default_path() -> Path:
    """Where ``build`` writes the wheel: ``~/.dvcray/dist/<wheel_name>``."""
    return files.dist_dir() / wheel_name()


def _package_files() -> dict[str, Path]:
    """``{path in the wheel: file}`` for the imported package, templates and configs included."""
    import dvcray_cli
    from dvcray_cli.packaged import cluster_configs_dir, templates_dir

    package = Path(dvcray_cli.__file__).resolve().parent
    files: dict[str, Path] = {}

    def add(folder: Path, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                files[f"{prefix}/{path.relative_to(folder).as_posix()}"] = path

    add(package, "dvcray_cli")
    # In a source checkout these sit beside the package; a wheel has them inside it.
    for name, folder in (("templates", templates_dir()), ("cluster_configs", cluster_configs_dir())):
        if not any(k.startswith(f"dvcray_cli/{name}/") for k in files) and folder.is_dir():
            add(folder, f"dvcray_cli/{name}")
    return files


def _metadata() -> tuple[str, str]:
    """METADATA and entry_points.txt of the installed distribution, with this version."""
    from importlib import metadata

    try:
        dist = metadata.distribution("dvcray")
        text = dist.read_text("METADATA") or ""
        entry_points = dist.read_text("entry_points.txt") or ""
    except metadata.PackageNotFoundError:
        text, entry_points = "", ""
    if not text:
        text = "Metadata-Version: 2.1\nName: dvcray\nVersion: 0.0.0\n"
    lines = [f"Version: {__version__}" if line.startswith("Version:") else line for line in text.split("\n")]
    if not entry_points:
        entry_points = "[console_scripts]\ndvcray = dvcray_cli.cli:main\n"
    return "\n".join(lines), entry_points


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def wheel_bytes() -> bytes:
    """The wheel of this dvcray, as bytes (deterministic)."""
    dist_info = f"dvcray-{__version__}.dist-info"
    meta, entry_points = _metadata()
    members: list[tuple[str, bytes]] = [(name, path.read_bytes()) for name, path in _package_files().items()]
    members += [
        (f"{dist_info}/METADATA", meta.encode()),
        (f"{dist_info}/WHEEL", (f"Wheel-Version: 1.0\nGenerator: dvcray {__version__}\n"
                                f"Root-Is-Purelib: true\nTag: {WHEEL_TAG}\n").encode()),
        (f"{dist_info}/entry_points.txt", entry_points.encode()),
    ]
    record = "\n".join([_record_line(n, d) for n, d in members] + [f"{dist_info}/RECORD,,", ""])
    members.append((f"{dist_info}/RECORD", record.encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def build(path: Path | None = None) -> Path:
    """Write the wheel of this dvcray to ``path`` (``default_path()``), atomically."""
    target = Path(path) if path else default_path()
    data = wheel_bytes()
    try:
        if target.read_bytes() == data:
            return target
    except OSError:
        pass
    return files.write_bytes(target, data, mode=0o644)
