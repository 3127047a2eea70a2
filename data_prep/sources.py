"""Document sources: a spec string -> an ordered, restartable stream of texts.

Spec syntax: `KIND:TARGET[,key=value...]` (or a bare alias):
    hf:HuggingFaceFW/fineweb-edu,config=sample-350BT,split=train,field=text    a hub dataset, streamed
    files:corpus/*.jsonl,field=text          local files by glob (txt, jsonl/json, parquet, arrow); several
                                             globs joined with '|'; txt files are one document each unless
                                             sample_by=line|paragraph
    offline[,max_mb=N]                       the offline default corpus (this Python's stdlib sources)
    fineweb-edu                              alias of the paper's hub source above
Any source takes weight=W (mixtures, see prepare.py).

Hub and local files go through the same `datasets.load_dataset(..., streaming=True)` call, so what the tests
exercise on local fixtures is the code path a cluster run takes on the hub. The stream order is the dataset's
own order (files sorted by name for globs), so a document's position is a stable resume cursor.
"""
import glob as globlib
import os
from dataclasses import dataclass, field as dfield

from distillery.shards import DataError

ALIASES = {
    "fineweb-edu": "hf:HuggingFaceFW/fineweb-edu,config=sample-350BT,split=train,field=text",
}
_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
            ".arrow": "arrow"}


@dataclass
class Source:
    kind: str
    target: str
    opts: dict = dfield(default_factory=dict)
    weight: float = 1.0

    @property
    def spec(self):
        extra = "".join(f",{k}={v}" for k, v in sorted(self.opts.items()))
        return f"{self.kind}{':' + self.target if self.target else ''}{extra}"


def parse(spec):
    spec = ALIASES.get(spec.split(",")[0], spec.split(",")[0]) + "".join("," + p for p in spec.split(",")[1:])
    head, *pairs = spec.split(",")
    kind, _, target = head.partition(":")
    if kind not in ("hf", "files", "offline"):
        raise DataError(f"source {spec!r}: kind must be hf:, files: or offline (e.g. "
                        f"'hf:HuggingFaceFW/fineweb-edu,config=sample-350BT' or 'files:data/*.jsonl')")
    opts = {}
    for p in pairs:
        k, eq, v = p.partition("=")
        if not eq:
            raise DataError(f"source {spec!r}: option {p!r} is not key=value")
        opts[k.strip()] = v.strip()
    weight = float(opts.pop("weight", 1.0))
    if weight <= 0:
        raise DataError(f"source {spec!r}: weight must be > 0")
    if kind != "offline" and not target:
        raise DataError(f"source {spec!r}: missing the dataset id or file glob after '{kind}:'")
    return Source(kind, target, opts, weight)


def local_files(target):
    files = []
    for pattern in target.split("|"):
        hits = sorted(globlib.glob(pattern, recursive=True))
        if not hits:
            raise DataError(f"no files match {pattern!r}; check the path or glob")
        files += hits
    return files


def _file_format(files, opts):
    if "format" in opts:
        return opts["format"]
    fmts = {_FORMATS.get(os.path.splitext(f.removesuffix(".gz").removesuffix(".zst"))[1]) for f in files}
    if None in fmts or len(fmts) != 1:
        raise DataError(f"cannot tell one format from {files[:3]}...; add format=json|parquet|arrow|text")
    return fmts.pop()


def load_rows(src):
    """The source's rows as a streaming iterable of dicts (datasets.IterableDataset) or of {'text': ...}."""
    if src.kind == "offline":
        from data_prep import stdlib_corpus
        max_mb = float(src.opts.get("max_mb", 0)) or None
        return ({"text": t} for t in stdlib_corpus.all_documents(max_bytes=int(max_mb * 2 ** 20) if max_mb else None))
    import datasets
    if src.kind == "hf":
        return datasets.load_dataset(src.target, src.opts.get("config"), split=src.opts.get("split", "train"),
                                     revision=src.opts.get("revision"), streaming=True)
    files = local_files(src.target)
    fmt = _file_format(files, src.opts)
    kw = {"sample_by": src.opts.get("sample_by", "document")} if fmt == "text" else {}
    return datasets.load_dataset(fmt, data_files=files, split="train", streaming=True, **kw)


def texts(src, skip=0):
    """Yield (raw_position, text) for the source's documents from raw row `skip` on. Empty texts are skipped
    but still counted in the position, so a resume cursor is a row count of the underlying dataset."""
    field = src.opts.get("field", "text")
    rows = load_rows(src)
    if skip and hasattr(rows, "skip"):
        rows, start = rows.skip(skip), skip  # streaming skip still reads but does not tokenize
    else:
        start = 0
    for pos, row in enumerate(rows, start):
        if pos < skip:
            continue
        try:
            t = row[field]
        except KeyError:
            raise DataError(f"source {src.spec!r} has no field {field!r} (fields: {', '.join(row)}); "
                            f"add field=<name>") from None
        if t:
            yield pos, t
