import pytest
import torch

from peakllm import data
from peakllm.errors import PeakError


def test_wiki_split_is_disjoint_and_stable():
    titles = [t for t, _ in data.wiki_articles()]
    assert len(titles) > 100
    evals = {t for t in titles if data.is_eval_article(t)}
    calib = set(titles) - evals
    assert evals and calib and not (evals & calib)
    eval_docs, calib_docs = data.wiki_split("eval"), data.wiki_split("calib")
    assert len(eval_docs) == len(evals) and len(calib_docs) == len(calib)
    assert not set(eval_docs) & set(calib_docs)
    assert all(doc.split("\n", 1)[0] in evals for doc in eval_docs)
    assert "'''" not in eval_docs[0]  # markup stripped


def test_named_sources_load():
    for name in ("news", "shakespeare", "bible"):
        docs = data.load_documents(name)
        assert docs and sum(map(len, docs)) > 100_000
    assert data.load_documents("calib")[-1] == data.load_documents("news")[-1]


def test_file_source_and_errors(tmp_path, text_file):
    assert data.load_documents(str(text_file))[0].startswith("The quick")
    with pytest.raises(PeakError, match="unknown dataset"):
        data.load_documents("no-such-dataset")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(PeakError, match="empty"):
        data.load_documents(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 10)
    with pytest.raises(PeakError, match="UTF-8"):
        data.load_documents(str(binary))


def test_tokenization_cache_and_calibration_sampling(tiny_tokenizer, text_file):
    first = data.tokenize_source(tiny_tokenizer, str(text_file))
    second = data.tokenize_source(tiny_tokenizer, str(text_file))  # from the cache
    assert torch.equal(first, second) and first.dtype == torch.int64
    a = data.calibration_segments(tiny_tokenizer, 4, 32, source=str(text_file), seed=3)
    b = data.calibration_segments(tiny_tokenizer, 4, 32, source=str(text_file), seed=3)
    c = data.calibration_segments(tiny_tokenizer, 4, 32, source=str(text_file), seed=4)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)
    joined = first.tolist()
    for row in a.tolist():  # every segment is a real contiguous slice of the text
        assert any(joined[i:i + 32] == row for i in range(len(joined) - 31))
    with pytest.raises(PeakError, match="empty"):
        data.calibration_segments(tiny_tokenizer, 0, 32, source=str(text_file))
