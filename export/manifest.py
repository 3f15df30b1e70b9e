"""The artifact manifest: what an export directory holds, what it was built from, and whether to reuse it.

DIR/manifest.json records, for every artifact (an ONNX graph or a TensorRT engine), the files it
consists of with their size and sha256, and the `key_fields` it was built from (weights digest,
dtype, shapes, tool versions ...). A later run recomputes those fields: equal -> reuse, different ->
rebuild (the log says which fields changed), files damaged -> a clear error naming the file.

The directory is ours only if every file in it is listed in our manifest: we never overwrite or
delete anything else. A manifest is read as untrusted input: every file name it lists must be a plain
name of a file directly inside DIR (no "..", no absolute path, no separator, no symlink leading out),
or the whole manifest is refused before any file is hashed, stat'ed or deleted.

What the manifest promises, and what it does not: it maps artifacts to the inputs they were built from
and to the bytes of their files. It is not a signature: anyone who can write DIR can rewrite it. So the
binding between an artifact and its weights is also kept inside the artifact (export/graph_stamp.py),
and a manifest whose key fields disagree with that stamp is refused, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "sd-runtime-export"
FORMAT_VERSION = 1
# Files we write while building; a crash may leave one behind, and it is still ours.
TEMP_PREFIX = ".sdrt-tmp-"
_CHUNK = 16 << 20


class ArtifactError(RuntimeError):
    """An export directory or artifact that cannot be used as it is (the message says why)."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_of(value) -> str:
    """sha256 of a JSON-serialisable value in canonical form."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hash_tree(root: str | os.PathLike) -> str:
    """Digest of a file, or of every file under a folder (relative names and contents)."""
    root = Path(root)
    if root.is_file():
        return sha256_file(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cannot hash weights: {root} does not exist")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def weights_digests(model_path: str | os.PathLike, components=("text_encoder", "unet", "vae")) -> dict:
    """{component: digest of its weights and config}: a diffusers folder hashes each component's
    subfolder; a single-file checkpoint holds every component, so each gets the file's digest."""
    model_path = Path(model_path)
    if model_path.is_file():
        whole = sha256_file(model_path)
        return {name: whole for name in components}
    if not model_path.is_dir():
        raise FileNotFoundError(f"model path {model_path} does not exist")
    digests = {}
    for name in components:
        folder = model_path / name
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {model_path} has no {name}/ subfolder to hash")
        digests[name] = hash_tree(folder)
    return digests


def tool_versions(names=("torch", "onnx", "onnxslim")) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe_files(out_dir: Path, names) -> dict[str, dict]:
    return {
        name: {"size": inside(out_dir, name).stat().st_size, "sha256": sha256_file(inside(out_dir, name))}
        for name in names
    }


def inside(out_dir: Path, name, listed_in: str = "the manifest") -> Path:
    """out_dir / name, for a name read from a file we may not have written: refused unless it is a
    plain file name (no separators, "..", absolute or empty names) whose resolved path, symlinks
    followed, stays directly inside out_dir."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or Path(name).is_absolute()
        or Path(name).name != name
    ):
        raise ArtifactError(
            f"{listed_in} lists file {name!r}, which is not a plain file name inside "
            f"{out_dir}; refusing to touch it (a manifest may only name files in its "
            f"own directory)"
        )
    path = out_dir / name
    root = out_dir.resolve()
    if path.is_symlink() or path.resolve().parent != root:
        raise ArtifactError(
            f"{listed_in} lists {name!r}, which is a symlink or resolves to "
            f"{path.resolve()} outside {root}; refusing to read or delete it"
        )
    return path


@dataclass(frozen=True)
class Decision:
    reuse: bool
    reason: str  # why it must be built, or "up to date"


class Manifest:
    """DIR/manifest.json in memory: {"format", "version", "artifacts": {artifact id: entry}}.

    An entry: {"files": {name: {size, sha256}}, "key_fields": {...}, "key": digest, "info": {...}}.
    """

    def __init__(self, out_dir: str | os.PathLike, data: dict | None = None):
        self.out_dir = Path(out_dir)
        self.data = data or {"format": FORMAT_NAME, "version": FORMAT_VERSION, "artifacts": {}}

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def artifacts(self) -> dict[str, dict]:
        return self.data["artifacts"]

    @classmethod
    def open(cls, out_dir: str | os.PathLike, *, create: bool = True) -> Manifest:
        """Read DIR's manifest, refusing a directory that holds anything that is not ours.

        An empty or missing directory gives an empty manifest (created on disk when create=True).
        """
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ArtifactError(f"export directory {out_dir} is a file, not a directory")
        manifest_path = out_dir / MANIFEST_NAME
        if manifest_path.is_symlink():
            raise ArtifactError(
                f"{manifest_path} is a symlink (to {manifest_path.resolve()}); we never "
                f"write one, so refusing to read or replace it"
            )
        if manifest_path.is_file():
            manifest = cls(out_dir, _read_manifest(manifest_path))
        else:
            manifest = cls(out_dir)
        manifest._refuse_foreign_files()
        if create:
            out_dir.mkdir(parents=True, exist_ok=True)
        return manifest

    def own_files(self) -> set[str]:
        names = {MANIFEST_NAME}
        for entry in self.artifacts.values():
            names.update(entry.get("files", {}))
            names.update(entry.get("extra_files", []))
        return names

    def _refuse_foreign_files(self) -> None:
        if not self.out_dir.is_dir():
            return
        ours = self.own_files()
        foreign = sorted(
            path.name
            for path in self.out_dir.iterdir()
            if path.name not in ours and not path.name.startswith(TEMP_PREFIX)
        )
        if foreign:
            listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            why = "its manifest.json does not list them" if self.path.is_file() else "it has no manifest.json of ours"
            raise ArtifactError(
                f"refusing to write into {self.out_dir}: it holds files that are not our artifacts "
                f"({listed}) and {why}; use an empty or new directory"
            )

    def decide(self, artifact: str, key_fields: dict) -> Decision:
        """Reuse `artifact` if it was built from the same key fields and its files are intact.

        Damaged files (size or hash differs from the manifest) raise ArtifactError: something other
        than us changed them, and silently rebuilding would hide that. Missing files are rebuilt.
        """
        entry = self.artifacts.get(artifact)
        if entry is None:
            return Decision(False, "not built yet")
        if entry.get("key") != digest_of(key_fields):
            changed = sorted(
                name
                for name in set(key_fields) | set(entry.get("key_fields", {}))
                if key_fields.get(name) != entry.get("key_fields", {}).get(name)
            )
            return Decision(False, "stale: " + ", ".join(changed or ["key"]) + " changed")
        missing = [name for name in entry["files"] if not inside(self.out_dir, name, str(self.path)).is_file()]
        if missing:
            return Decision(False, f"file {', '.join(missing)} missing")
        self.verify(artifact)
        return Decision(True, "up to date")

    def verify(self, artifact: str) -> dict:
        """Check every file of `artifact` against the manifest; return its entry."""
        entry = self.artifacts.get(artifact)
        if entry is None:
            raise ArtifactError(f"{self.path} lists no artifact {artifact!r}; export it first")
        for name, expected in entry["files"].items():
            path = inside(self.out_dir, name, str(self.path))
            if not path.is_file():
                raise ArtifactError(f"{path} is missing (listed in {self.path})")
            size = path.stat().st_size
            if size != expected["size"]:
                raise ArtifactError(
                    f"{path} is {size} bytes but {MANIFEST_NAME} says {expected['size']} "
                    f"(truncated or replaced); delete it and export again"
                )
            found = sha256_file(path)
            if found != expected["sha256"]:
                raise ArtifactError(
                    f"{path} content hash {found[:12]}... differs from {MANIFEST_NAME}'s "
                    f"{expected['sha256'][:12]}... (modified or from another model); "
                    f"delete it and export again"
                )
        return entry

    def record(self, artifact: str, files, key_fields: dict, info: dict | None = None, extra_files=()) -> dict:
        """Register freshly written files of `artifact` and save the manifest."""
        entry = {
            "files": describe_files(self.out_dir, files),
            "key_fields": key_fields,
            "key": digest_of(key_fields),
            "info": info or {},
            "extra_files": sorted(extra_files),
        }
        self.artifacts[artifact] = entry
        self.save()
        return entry

    def forget(self, artifact: str) -> None:
        """Delete the files of an artifact we are about to rebuild (only ever files we listed)."""
        entry = self.artifacts.pop(artifact, None)
        if entry is None:
            return
        paths = [inside(self.out_dir, name, str(self.path)) for name in entry.get("files", {})]
        for path in paths:  # every name checked before the first deletion
            path.unlink(missing_ok=True)
        self.save()

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    def temp_path(self, final_name: str) -> Path:
        return self.out_dir / f"{TEMP_PREFIX}{os.getpid()}-{final_name}"


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path} is not a readable manifest ({err}); refusing to touch that directory") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{path} is not a manifest written by this exporter (no "
            f'"format": "{FORMAT_NAME}"); refusing to touch that directory'
        )
    if data.get("version") != FORMAT_VERSION or not isinstance(data.get("artifacts"), dict):
        raise ArtifactError(
            f"{path} has manifest version {data.get('version')!r}; this exporter "
            f"reads version {FORMAT_VERSION}: export into a new directory"
        )
    for artifact, entry in data["artifacts"].items():
        _check_entry(path, artifact, entry)
    return data


def _check_entry(path: Path, artifact: str, entry) -> None:
    """The structure of one artifact entry, and every file name in it confined to the directory."""
    where = f"{path} (artifact {artifact!r})"
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("files"), dict)
        or not isinstance(entry.get("extra_files", []), list)
    ):
        raise ArtifactError(
            f'{where}: entry is not {{"files": {{name: {{size, sha256}}}}, ...}}; refusing to touch that directory'
        )
    for name, described in entry["files"].items():
        inside(path.parent, name, where)
        if (
            not isinstance(described, dict)
            or isinstance(described.get("size"), bool)
            or not isinstance(described.get("size"), int)
            or not isinstance(described.get("sha256"), str)
        ):
            raise ArtifactError(f"{where}: file {name!r} has no integer size and string sha256")
    for name in entry.get("extra_files", []):
        inside(path.parent, name, where)


def atomic_write_text(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temp, 0o644)  # mkstemp makes it owner-only; deployments read it as another user
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
