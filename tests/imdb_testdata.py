"""Small aclImdb trees and archives in the real layout, for tests."""

import tarfile
from pathlib import Path

REVIEWS_PER_CLASS = 3


def write_imdb(root: Path, splits=("train", "test"), reviews=None) -> Path:
  """Writes `root/aclImdb/<split>/{neg,pos}/<id>_<rating>.txt` (+ train/unsup); returns root/aclImdb.

  `reviews` maps (split, cls) to a list of bytes; the default is REVIEWS_PER_CLASS short reviews.
  """
  top = root / "aclImdb"
  for split in splits:
    for cls in ("neg", "pos"):
      folder = top / split / cls
      folder.mkdir(parents=True)
      default = [f"{split} {cls} review {i}".encode() for i in range(REVIEWS_PER_CLASS)]
      for i, data in enumerate((reviews or {}).get((split, cls), default)):
        (folder / f"{i}_{8 if cls == 'pos' else 2}.txt").write_bytes(data)
  if "train" in splits:  # Unlabelled reviews must be ignored.
    (top / "train" / "unsup").mkdir()
    (top / "train" / "unsup" / "0_0.txt").write_text("unlabelled review")
  (top / "README").write_text("Large Movie Review Dataset")
  return top


def make_archive(folder: Path, path: Path, arcname: str = "aclImdb") -> Path:
  with tarfile.open(path, "w:gz") as archive:
    archive.add(folder, arcname=arcname)
  return path


def sentiment_reviews(split: str, count: int) -> dict:
  """`count` reviews per class whose words give their label away, so a tiny model can learn them."""
  words = {"neg": ["bad", "awful", "boring"], "pos": ["good", "great", "wonderful"]}
  return {(split, cls): [f"a {words[cls][i % 3]} movie number {i}".encode() for i in range(count)]
          for cls in ("neg", "pos")}
