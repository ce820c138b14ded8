"""Reading the members of a .tar.gz/.tgz/.tar archive in one streaming pass, with clear errors.

Shared by the labelled IMDB reader (`input_pipeline`) and the pretraining corpus (`corpus`).
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib

SUFFIXES = (".tar.gz", ".tgz", ".tar")


def read_matching(path: str, member_re: re.Pattern[str], *, hint: str, what: str = "archive"
                  ) -> tuple[list[tuple[re.Match[str], bytes]], list[str]]:
  """The files of archive `path` whose names match `member_re`, as (match, contents), in archive order;
  also the archive's first three member names (for error messages that show its layout).

  Streams without seeking, so an 80 MB .tar.gz is read once. Raises ValueError naming `what`, `path`
  and `hint` when the archive is corrupt, truncated or unreadable.
  """
  found, first_members = [], []
  # tarfile's own gzip stream ends silently on a truncated download; GzipFile raises EOFError.
  opener = gzip.open if path.endswith((".gz", ".tgz")) else open
  try:
    with opener(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
      for member in archive:
        if len(first_members) < 3:
          first_members.append(member.name)
        match = member_re.match(member.name)
        if match and member.isfile():
          found.append((match, archive.extractfile(member).read()))
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise ValueError(f"Cannot read {what} {path!r} ({type(e).__name__}: {e}); it is corrupt, "
                     f"truncated or unreadable. Download it again or {hint}.") from e
  return found, first_members
