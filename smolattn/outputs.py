"""The one output writer: every folder or file a script writes goes through here, after an ownership check.

Rule (README, "Your files are safe"): nothing we did not write is ever deleted or overwritten. Each
output kind declares the exact names it writes and the marker that proves an existing one is ours;
an existing output is replaced or written into only if it passes :meth:`Kind.foreign`, anything else
is refused with one line (``UserError``) that names the file, before work starts, and left
byte-identical. A crash at any point leaves the old or the new output complete (write to a
temporary sibling, fsync, rename, fsync the parent). numpy-free, torch-free: the viewer may import it.

API (other modules use only these names):

    Kind(name, files=(), folders=None, *, each=(), marker=None, markers=None)
        name      words for messages: "run", "head analysis", "POPE output folder"
        files     exact file names it writes               folders  {name: spec} exact sub-folder names
        each      [(regex, spec)]: more entries by name pattern (grid_<score>.png, split folders ...)
                  spec = None (a file), a compiled regex (a folder holding only files matching it),
                  a Kind (a folder of that kind, checked the same way) or DIR (a folder, not looked into)
        marker    (file name, Marker): an existing non-empty folder is ours only if that file carries it
        markers   {file name: Marker}: files that must carry their marker wherever they appear
      .names        frozenset of the exact names (files and folders)
      .foreign(p)   None when folder ``p`` is ours (or empty), else the first offending path, in words
      .owned(p)     ``foreign(p) is None`` for an existing directory
    AnyOf(*kinds)   a Kind-like that owns what any of ``kinds`` owns
    NEW             the kind that owns nothing: only a new or empty folder may be written
    JsonField(value, field="format", legacy=None)   marker: a JSON object whose ``field`` is ``value``
                                       (``legacy(obj)``: our files from before the field existed)
    PngText(value, key="smolattn")     marker: a PNG tEXt chunk ``key`` = ``value``
    LastLine(text)                      marker: the file's last line is ``text``
      marker.on(path) -> bool (the file on disk carries it); marker.carried(data: bytes) -> bool

    check_target(final, kind, hint, whole=True)   refuse (UserError, one line naming the file) a
                                       folder that may not be written: a symlink, a file, not
                                       ``kind``'s; with ``whole`` also the current directory (or above)
    atomic_dir(final, kind, hint)      context manager: yields a temporary sibling folder, puts it in
                                       place of ``final`` (checked before and again at the end)
    check_file(path, marker)           refuse a single file that exists and does not carry ``marker``
    replace_file(path, data, marker)   one file, atomically (``data`` must carry the marker)
    replace_files({path: (data, marker)})  several files: all checked, all written, then all renamed
    recover(parent, names)             clean up what killed writers of ``names`` left in ``parent``
    crash_point(step), CRASH_ENV, CRASH_STEPS    test hook: SIGKILL at a step of the protocol
    fsync_tree(root), write_bytes_durably(path, data)

The kinds declared so far: ``store.RUN`` (and ``store.REFERENCE_RUN``, replaced only with
--replace-reference-run: use ``store.check_target(path, replace_reference)`` / ``store.write_run``),
``head_report.KIND``, ``pope.KIND`` (+ ``pope.RESULTS_MARKER``, ``pope.REPORT_MARKER``),
``heatmap.PNG_MARKER`` / ``heatmap.JSON_MARKER``, ``batch.CONFIG_MARKER``. A new output kind:

    KIND = outputs.Kind("intervention report", ("effects.json", "report.md"), {"runs": RUNS_KIND},
                        marker=("effects.json", outputs.JsonField("smolattn-intervention")))
    outputs.check_target(out, KIND)                 # before the model loads: one line, nothing touched
    with outputs.atomic_dir(out, KIND) as tmp:      # ... write every file into tmp; effects.json must
        ...                                         # carry the marker, or the next run refuses the folder
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import zlib
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

CRASH_ENV = "SMOLATTN_CRASH_AT"   # tests: SIGKILL this process at the named step of the protocol
CRASH_STEPS = ("writing", "written", "aside", "swapped", "deleting")
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}-(?P<host>.*)-(?P<pid>\d+)$")
HOST = socket.gethostname().replace("/", "_")
DIR = object()   # spec: a folder that is not looked into


def crash_point(step: str) -> None:
    """Test hook: ``SMOLATTN_CRASH_AT=<step>`` kills this process (SIGKILL, no clean-up) at ``step``."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def temp_name(name: str, kind: str) -> str:
    """``.NAME.tmp-RAND-HOST-PID`` (being written) or ``.NAME.old-...`` (a replaced folder being
    deleted). Readers skip dot names; :func:`recover` finds the ones whose writer is dead."""
    return f".{name}.{kind}-{secrets.token_hex(4)}-{HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_path(path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file and directory under ``root`` (itself included), so a rename of ``root``
    never publishes data that a power cut could still lose."""
    for folder, _, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(folder, f))
        fsync_path(folder, directory=True)


def write_bytes_durably(path, data: bytes) -> None:
    """Write ``path`` in place and fsync it (inside a temporary directory that is renamed later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _empty(folder) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


# ------------------------------------------------------------------------------------------- markers

class JsonField:
    """Marker: the file is a JSON object whose ``field`` is ``value``; ``legacy``: a test for our
    files written before the field existed (obj -> bool)."""

    def __init__(self, value, field: str = "format", legacy=None):
        self.value, self.field, self.legacy = value, field, legacy

    def carried(self, data: bytes) -> bool:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(obj, dict) and (obj.get(self.field) == self.value
                                          or (self.legacy is not None and bool(self.legacy(obj))))

    def on(self, path) -> bool:
        try:
            return self.carried(Path(path).read_bytes())
        except OSError:
            return False

    def __repr__(self):
        return f'"{self.field}": {json.dumps(self.value)}'


class PngText:
    """Marker: a PNG whose tEXt chunk ``key`` is ``value`` (read from the chunk headers, no image decode)."""

    SIGNATURE = b"\x89PNG\r\n\x1a\n"

    def __init__(self, value: str, key: str = "smolattn"):
        self.value, self.key = value, key

    def _scan(self, read) -> bool:
        if read(8) != self.SIGNATURE:
            return False
        want = self.key.encode("latin-1") + b"\0" + self.value.encode("latin-1")
        while True:
            head = read(8)
            if len(head) < 8:
                return False
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"IEND":
                return False
            body = read(length + 4)                         # data + CRC
            if len(body) < length + 4:
                return False
            if kind == b"tEXt" and body[:length] == want:
                return True

    def carried(self, data: bytes) -> bool:
        pos = [0]

        def read(n):
            out = data[pos[0]:pos[0] + n]
            pos[0] += n
            return out
        return self._scan(read)

    def on(self, path) -> bool:
        try:
            with open(path, "rb") as f:
                return self._scan(f.read)
        except OSError:
            return False

    def chunk(self) -> bytes:
        """The tEXt chunk itself (for writers that do not use PIL's PngInfo)."""
        body = self.key.encode("latin-1") + b"\0" + self.value.encode("latin-1")
        return len(body).to_bytes(4, "big") + b"tEXt" + body + zlib.crc32(b"tEXt" + body).to_bytes(4, "big")

    def __repr__(self):
        return f"PNG text {self.key}={self.value}"


class LastLine:
    """Marker: the file's last line is ``text`` (Markdown reports: an HTML comment, invisible when shown)."""

    def __init__(self, text: str):
        self.text = text

    def carried(self, data: bytes) -> bool:
        return data.rstrip(b"\r\n").rsplit(b"\n", 1)[-1].rstrip(b"\r").decode("utf-8", "replace") == self.text

    def on(self, path) -> bool:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - len(self.text.encode()) - 4))
                return self.carried(f.read())
        except OSError:
            return False

    def __repr__(self):
        return f"last line {self.text!r}"


# --------------------------------------------------------------------------------------------- kinds

class Kind:
    """One output kind: the exact names it writes and how an existing one shows it is ours."""

    def __init__(self, name: str, files=(), folders=None, *, each=(), marker=None, markers=None):
        self.name = name
        self.files = frozenset(files)
        self.folders = dict(folders or {})
        self.names = self.files | frozenset(self.folders)
        self.each = tuple((re.compile(p) if isinstance(p, str) else p, spec) for p, spec in each)
        self.marker = marker
        self.markers = dict(markers or {})
        if marker is not None:
            self.markers.setdefault(marker[0], marker[1])

    def _spec(self, name: str):
        """(True, spec) for a name this kind writes, else (False, None)."""
        if name in self.files:
            return True, None
        if name in self.folders:
            return True, self.folders[name]
        for pattern, spec in self.each:
            if pattern.match(name):
                return True, spec
        m = TEMP_NAME.match(name)    # what a killed writer of one of our names left (recover() cleans it)
        if m and self._spec(m["name"])[0]:
            return True, DIR
        return False, None

    def foreign(self, path) -> str | None:
        """None when the existing folder ``path`` is ours, or empty; else the first offending entry in words."""
        path = os.fspath(path)
        if os.path.islink(path) or not os.path.isdir(path):
            return f"{path} is not a directory"
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:               # strings, not Paths: a POPE resume checks thousands of runs
            p = e.path
            ok, spec = self._spec(e.name)
            if not ok:
                return f"{p} is not one of its files"
            if e.is_symlink():
                return f"{p} is a symbolic link"
            if TEMP_NAME.match(e.name):
                continue
            if spec is None:
                if not e.is_file(follow_symlinks=False):
                    return f"{p} is not a plain file"
                marker = self.markers.get(e.name)
                if marker is not None and not marker.on(p):
                    return f"{p} is not ours: no {marker!r}"
                continue
            if not e.is_dir(follow_symlinks=False):
                return f"{p} is not one of its files"
            if spec is DIR:
                continue
            if isinstance(spec, re.Pattern):
                with os.scandir(p) as sub:
                    for s in sub:
                        if not s.is_file(follow_symlinks=False) or not spec.match(s.name):
                            return f"{s.path} is not one of its files"
                continue
            why = spec.foreign(p)
            if why is not None:
                return why
        if entries and self.marker is not None and not any(e.name == self.marker[0] for e in entries):
            return f"it has no {self.marker[0]} of ours"
        return None

    def owned(self, path) -> bool:
        return self.foreign(path) is None

    def __repr__(self):
        return f"Kind({self.name!r})"


class AnyOf:
    """Owns what any of ``kinds`` owns (e.g. our runs or, on request, reference-format runs)."""

    def __init__(self, *kinds, name: str | None = None):
        self.kinds, self.name = kinds, name or kinds[0].name

    def foreign(self, path):
        whys = [k.foreign(path) for k in self.kinds]
        if None in whys:
            return None
        named = [w for w in whys if not w.startswith("it has no")]   # rather the reason that names a file
        return (named or whys)[0]

    def owned(self, path) -> bool:
        return self.foreign(path) is None


NEW = Kind("folder")   # owns nothing but an empty folder


# ----------------------------------------------------------------------------------------- folders

def check_target(final, kind, hint: str = "choose a new or empty output directory", whole: bool = True) -> None:
    """Refuse (UserError, one line) any ``final`` that ``kind`` may not be written to: it must not
    exist, be an empty directory, or be ``kind``'s (:meth:`Kind.foreign`). Never a symbolic link or a
    file; with ``whole`` (the folder is replaced as one, by :func:`atomic_dir`) never the current
    directory or one above it either. Creates nothing; call it before work starts."""
    final = Path(final)
    if final.is_symlink():
        raise UserError(f"{final} is a symbolic link; give the directory itself")
    if not final.exists():
        return
    if not final.is_dir():
        raise UserError(f"{final} exists and is not a directory; choose another output directory")
    if whole and Path.cwd().resolve().is_relative_to(final.resolve()):
        raise UserError(f"{final} is the current directory (or holds it): a {kind.name} is written into a "
                        "directory of its own; give a new one")
    why = kind.foreign(final)
    if why is not None:
        raise UserError(f"{final} exists and is not a {kind.name} written by smolattn ({why}); "
                        f"it is left untouched: {hint}")


def recover(parent, names) -> int:
    """Finish what killed writers of ``names`` in ``parent`` left, touching only entries of dead
    processes on this host: a folder set aside (``.NAME.old-``) with nothing in its place is renamed
    back; the rest (temporary folders and files, old folders already replaced) is deleted. Returns how
    many entries were handled. Live writers' and other hosts' entries are left alone."""
    parent, names, n = Path(parent), set(names), 0
    if not parent.is_dir():
        return 0
    with os.scandir(parent) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        m = TEMP_NAME.match(entry.name)
        if (not m or m["name"] not in names or m["host"] != HOST or _alive(int(m["pid"]))
                or entry.is_symlink()):
            continue
        final = parent / m["name"]
        if not entry.is_dir():
            if m["kind"] == "tmp":
                os.unlink(entry.path)      # a file replace_file did not finish
                n += 1
            continue
        if m["kind"] == "old" and not os.path.lexists(final):
            os.rename(entry.path, final)   # killed between "aside" and "swapped": put the old folder back
            fsync_path(parent, directory=True)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
        n += 1
    return n


def _remove_old(old: Path) -> None:
    for i, f in enumerate(sorted(old.rglob("*"), reverse=True)):
        if i == 1:
            crash_point("deleting")
        f.unlink() if not f.is_dir() or f.is_symlink() else f.rmdir()
    old.rmdir()


@contextmanager
def atomic_dir(final, kind, hint: str = "choose a new or empty output directory"):
    """Yield a temporary sibling directory; when the block succeeds, fsync it and put it in place of
    ``final``. ``final`` must pass :func:`check_target` for ``kind`` (before and again at the end). A
    replaced directory is renamed aside, the new one renamed in, then the old one deleted;
    :func:`recover` (run first by every writer) undoes what a crash in between left."""
    final = Path(final)
    check_target(final, kind, hint)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final.parent, [final.name])
    tmp = final.parent / temp_name(final.name, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        crash_point("written")
        check_target(final, kind, hint)      # again: it may have appeared while we computed
        parent = final.parent
        if final.is_dir() and not _empty(final):
            old = parent / temp_name(final.name, "old")
            os.rename(final, old)
            fsync_path(parent, directory=True)
            crash_point("aside")
            os.rename(tmp, final)
            fsync_path(parent, directory=True)
            crash_point("swapped")
            _remove_old(old)
        else:   # new, or an empty directory (rename(2) replaces it atomically)
            os.rename(tmp, final)
            fsync_path(parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------- files

def check_file(path, marker) -> None:
    """Refuse (UserError, one line) a single output file that exists and does not carry ``marker``
    (no flag overrides this). Creates nothing."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link; it is left untouched: choose another output file")
    if path.exists() and (not path.is_file() or not marker.on(path)):
        raise UserError(f"{path} exists and was not written by smolattn (no {marker!r}); "
                        "it is left untouched: move it away or choose another output file")


def replace_files(items: dict) -> None:
    """Write several files, ``{path: (bytes, marker)}``, each carrying its marker: every target is
    checked first (:func:`check_file`), all are written to temporary siblings and fsynced, then
    renamed in place (each rename atomic) and the folders fsynced. A failure leaves no temporary file."""
    items = {Path(p): v for p, v in items.items()}
    for path, (data, marker) in items.items():
        if not marker.carried(data):
            raise ValueError(f"{path}: the data to write does not carry {marker!r}")
        check_file(path, marker)
    temps = {}
    try:
        for path, (data, _) in items.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            recover(path.parent, [path.name])
            temps[path] = path.parent / temp_name(path.name, "tmp")
            write_bytes_durably(temps[path], data)
        for path, tmp in temps.items():
            check_file(path, items[path][1])        # again, just before the rename
            os.replace(tmp, path)
        for folder in {p.parent for p in items}:
            fsync_path(folder, directory=True)
    except BaseException:
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()
        raise


def replace_file(path, data: bytes, marker) -> None:
    """One file, atomically and durably, only where nothing or a file of ours (``marker``) is."""
    replace_files({path: (data, marker)})
