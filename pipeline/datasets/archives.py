"""Downloads of public datasets: fetch with a checksum, unpack without trusting the archive.

An archive from the internet may name members like `../../.bashrc` or `/etc/cron.d/x`, or hold
links and device files. `safe_extract` checks every member before anything is written and refuses
the archive, naming the member, if one would land outside the target folder.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from pipeline.datasets.base import DatasetError


def download_and_extract(url: str, root: Path, filename: str, md5: str | None, remove_archive: bool = False) -> None:
    """Fetch `url` into `root/filename` (MD5-checked by torchvision), then `safe_extract` it into `root`."""
    from torchvision.datasets.utils import download_url

    root.mkdir(parents=True, exist_ok=True)
    download_url(url, str(root), filename=filename, md5=md5)
    archive = root / filename
    safe_extract(archive, root)
    if remove_archive:
        archive.unlink()


def _check_member(target: Path, name: str, archive: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise DatasetError(f"{archive}: refusing to extract {name!r}, which would land outside {target}")
    resolved = (target / path).resolve()
    if resolved != target and target not in resolved.parents:
        raise DatasetError(f"{archive}: refusing to extract {name!r}, which would land outside {target}")


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack a zip or tar (.gz/.bz2/.xz) archive into `target`; refuse it whole if any member escapes."""
    target = target.resolve()
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.infolist():
                _check_member(target, member.filename, archive)
            zipped.extractall(target)
        return
    try:
        opened = tarfile.open(archive)
    except (tarfile.TarError, OSError) as err:
        raise DatasetError(f"{archive}: not a zip or tar archive ({err})") from None
    with opened as tarred:
        for member in tarred.getmembers():
            _check_member(target, member.name, archive)
            if member.issym() or member.islnk():
                link = member.linkname if member.islnk() else str(PurePosixPath(member.name).parent / member.linkname)
                _check_member(target, link, archive)
            elif not (member.isfile() or member.isdir()):
                raise DatasetError(f"{archive}: refusing to extract {member.name!r}, which is not a file or folder")
        # The standard library's own "data" filter as a second line (Python >= 3.11.4).
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tarred.extractall(target, **extra)
